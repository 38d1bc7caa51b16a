"""`project(x, w, in_axes)`: x `[..., *in]` times a weight `[*in, *out]`, float or QTensor.

Float weights (and QTensors off GPU) contract with one `dot_general` (a QTensor dequantizes
first, inside the same jitted step). On a GPU an int4 QTensor goes through the fused Pallas
kernel (`pallas_kernels.int4_matmul`), which reads the packed weight directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.quant import tensor as qtensor

# "auto": the fused int4 kernel on GPU only; "always": also elsewhere, in the Pallas interpreter
# (tests); "never": always dequantize, then dot.
KERNEL = "auto"


def _fused(w) -> bool:
  if not (qtensor.is_qtensor(w) and w.bits == 4 and w.values.ndim == 2):
    return False
  if KERNEL == "never" or (KERNEL == "auto" and jax.default_backend() != "gpu"):
    return False
  return w.group_size % 32 == 0 and w.cols % 64 == 0


def project(x: jax.Array, w, in_axes: int = 1) -> jax.Array:
  """Contracts x's last `in_axes` axes with w's first `in_axes` axes, in x's dtype."""
  if _fused(w):
    from pallas_kernels.int4_matmul import int4_matmul
    lead = x.shape[:x.ndim - in_axes]
    x2 = x.reshape(math.prod(lead), w.rows)
    y = int4_matmul(x2, w.values, w.scales, w.zeros, interpret=jax.default_backend() != "gpu")
    return y.reshape(*lead, *w.shape[in_axes:])
  return jnp.tensordot(x, w.astype(x.dtype), axes=in_axes)
