"""`LoraWeight`: a frozen base weight plus a trainable low-rank update, in the params tree
where the plain weight was.

A projection weight `[*in, *out]` (float or QTensor, `in_axes` leading axes contracted) becomes
`base + scale * a @ b` with a `[*in, r]` and b `[r, *out]`, and `ops.quant_matmul.project`
computes `x @ base + scale * (x @ a) @ b` without forming the sum: for a QTensor base (QLoRA)
the base stays packed, and the update costs `r * (in + out)` multiply-adds a token. Stacked
block weights carry their leading batch axes (`[L]`) on all three parts, so scanning or
indexing the layers slices a LoraWeight like any other leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """`base` `[*batch, *in, *out]` (array or QTensor), `a` `[*batch, *in, r]`, `b`
  `[*batch, r, *out]`; the update is `scale * a @ b` (`scale`: alpha / r, or alpha / sqrt(r)
  for rsLoRA)."""
  base: Any
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  in_axes: int = dataclasses.field(metadata=dict(static=True))

  def __getitem__(self, key):
    if key is Ellipsis:  # how a model reads its weights (`self.q[...]`)
      return self
    raise TypeError("a LoraWeight supports only [...]; merge() it to index")

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """`scale * a @ b` `[*batch, *in, *out]` in `dtype`."""
    lead = self.a.ndim - self.in_axes - 1  # batch axes
    a = self.a.reshape(*self.a.shape[:lead], -1, self.rank).astype(dtype)
    b = self.b.reshape(*self.b.shape[:lead], self.rank, -1).astype(dtype)
    return (self.scale * jnp.matmul(a, b)).reshape(self.shape).astype(dtype)

  def merge(self, dtype=jnp.float32) -> jax.Array:
    """The plain weight `base + scale * a @ b` (a QTensor base dequantized first)."""
    return self.base.astype(dtype) + self.delta(dtype)

  def astype(self, dtype) -> jax.Array:
    return self.merge(dtype)


def is_lora(x) -> bool:
  return isinstance(x, LoraWeight)
