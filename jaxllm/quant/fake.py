"""Fake quantization for quantization-aware training: the forward sees the weights rounded as
`jaxllm.quantize` would round them; the backward passes gradients straight through to the
float weights (the straight-through estimator), so training learns weights that survive
rounding."""

from __future__ import annotations

import jax

from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor


def fake_quant(w: jax.Array, *, bits: int, group_size: int = 0, symmetric: bool = True,
               in_axes: int = 1, batch_axes: int = 0) -> jax.Array:
  """Round-to-nearest dequantized `w` in the forward pass; identity gradient."""
  rounded = qtensor.quantize(jax.lax.stop_gradient(w), bits=bits, group_size=group_size,
                             symmetric=symmetric, in_axes=in_axes,
                             batch_axes=batch_axes).dequantize(w.dtype)
  return w + jax.lax.stop_gradient(rounded - w)


def fake_quant_params(params: dict, spec: qparams.QuantSpec) -> dict:
  """Every weight the spec would quantize, fake-quantized (the rest unchanged)."""
  flat = qparams.flatten(params)
  for path, w in flat.items():
    if spec.wants(path):
      in_axes, batch_axes = qparams.LAYOUTS[path]
      flat[path] = fake_quant(w, bits=spec.bits, group_size=spec.group_size,
                              symmetric=spec.symmetric, in_axes=in_axes, batch_axes=batch_axes)
  return qparams.unflatten(flat)
