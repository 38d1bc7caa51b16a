"""Parameters with logical axis names, and RMSNorm.

Every parameter is an `nnx.Param` whose `axes` metadata names its logical axes (see
`jaxllm.parallel.rules`); stacked layer parameters get a leading `layers` axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float,
          dtype) -> nnx.Param:
  """A normal(0, std) initialised parameter named by logical `axes`."""
  assert len(shape) == len(axes), (shape, axes)
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
  """x / rms(x) * (offset + scale) over the trailing axes that `dim` spans, in float32.

  `offset` 1.0 is Gemma's convention: weights stored around 0 (and initialised there).

  `dim` an int normalises the last axis (scale `[dim]`, logical axis `axis_name`); a tuple such
  as `(H, Dh)` normalises the last len(dim) axes together (OLMo 2's norm over all heads), with
  `axis_name` a tuple of as many logical axes.
  """

  def __init__(self, dim: int | tuple[int, ...], eps: float, param_dtype,
               axis_name: str | tuple[str, ...] = "embed", offset: float = 0.0):
    shape = (dim,) if isinstance(dim, int) else tuple(dim)
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    self.scale = nnx.Param(jnp.full(shape, 1.0 - offset, param_dtype), axes=axes)
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.scale[...].astype(jnp.float32) + self.offset
    over = tuple(range(x.ndim - scale.ndim, x.ndim))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=over, keepdims=True) + self.eps)
    return (normed * scale.reshape((1,) * (x.ndim - scale.ndim) + scale.shape)).astype(x.dtype)
