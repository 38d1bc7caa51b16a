"""`project(x, w, in_axes)`: x `[..., *in]` times a weight `[*in, *out]` (float, QTensor or
LoraWeight); `lookup` and `project_rows`: the embedding table's two uses (rows by id, and the
tied head).

Float weights contract with one `dot_general`; an int8 QTensor dequantizes first, inside the
same jitted step (XLA:CPU folds the int8 convert into the dot); an int4 QTensor is multiplied
as its two nibble halves (`_int4_halves`). On a GPU an int4 QTensor goes through the fused
Pallas kernel (`pallas_kernels.int4_matmul`), which reads the packed weight directly.

On CPU, a decode step's small-batch products take `cpu_gemv`'s C++ kernel (float32, int8
and int4 weights read in place; `cpu_gemv.cpu_kernel(mode)` says when).

Which path int4 takes is `int4_kernel(mode)`, a context read when the step traces: "auto" (the
default: the fused kernel on GPU only), "always" (also elsewhere, in the Pallas interpreter:
tests) or "never" (always dequantize, then dot).
"""

from __future__ import annotations

import contextvars
import math

import jax
import jax.numpy as jnp

from jaxllm.lora import weight as lora_weight
from jaxllm.ops import cpu_gemv, kernel_mode, stacked
from jaxllm.quant import tensor as qtensor
from pallas_kernels import backends

INT4_KERNEL_MODES = kernel_mode.MODES
_INT4_KERNEL = contextvars.ContextVar("int4_kernel", default="auto")


def int4_kernel(mode: str):
  """Within the block (and the jitted functions traced in it), int4 weights take the fused
  kernel per `mode`: auto | always | never."""
  return kernel_mode.scoped(_INT4_KERNEL, mode, "int4 kernel")


def fused(w) -> bool:
  """Whether `project` sends weight `w` through the fused int4 kernel."""
  if not (qtensor.is_qtensor(w) and w.bits == 4 and w.values.ndim == 2):
    return False
  mode = _INT4_KERNEL.get()
  if mode == "never" or (mode == "auto" and backends.target_platform() != "gpu"):
    return False
  return w.group_size % 32 == 0 and w.cols % 64 == 0


def project(x: jax.Array, w, in_axes: int = 1, preferred_element_type=None) -> jax.Array:
  """Contracts x's last `in_axes` axes with w's first `in_axes` axes, in x's dtype (or
  `preferred_element_type`). A LoraWeight adds its low-rank path, `scale * (x @ a) @ b`, to
  the base's product (each part may be a LayerView, the base a QTensor); a RowLoraWeight adds
  each row's own adapter (x's first axis is the batch)."""
  if lora_weight.is_lora(w):
    y = project(x, w.base, in_axes, preferred_element_type)
    update = project(project(lora_weight.dropped(x, w), w.a, in_axes), w.b, 1) * jnp.asarray(
        w.scale, x.dtype)
    return y + update.astype(y.dtype)
  if lora_weight.is_row_lora(w):
    return y_plus_row_updates(x, w, in_axes, preferred_element_type)
  if lora_weight.is_bank(w):
    raise TypeError("a LoraBank reached a product: select each row's adapter first "
                    "(jaxllm.lora.bank.select)")
  if cpu_gemv.applies(x, w, in_axes):
    lead = x.shape[:x.ndim - in_axes]
    shape = (w.get() if isinstance(w, stacked.LayerView) else w).shape
    y = cpu_gemv.matmul(x.reshape(-1, math.prod(x.shape[x.ndim - in_axes:])), w)
    return y.reshape(*lead, *shape[in_axes:]).astype(preferred_element_type or x.dtype)
  if isinstance(w, stacked.LayerView):
    w = w.get()
  if preferred_element_type is not None and qtensor.is_qtensor(w):
    return project(x, w, in_axes).astype(preferred_element_type)
  if fused(w):
    from pallas_kernels.int4_matmul import int4_matmul
    lead = x.shape[:x.ndim - in_axes]
    x2 = x.reshape(math.prod(lead), w.rows)
    y = int4_matmul(x2, w.values, w.scales, w.zeros,
                    interpret=backends.target_platform() != "gpu")
    return y.reshape(*lead, *w.shape[in_axes:])
  if qtensor.is_qtensor(w) and w.bits == 4 and w.values.ndim == 2:
    lead = x.shape[:x.ndim - in_axes]
    y = _int4_halves(x.reshape(*lead, w.rows), w)
    return y.reshape(*lead, *w.shape[in_axes:])
  return jnp.tensordot(x, w.astype(x.dtype), axes=in_axes,
                       preferred_element_type=preferred_element_type)


def y_plus_row_updates(x: jax.Array, w, in_axes: int, preferred_element_type) -> jax.Array:
  """x `[B, ..., *in]` times a RowLoraWeight: the base's product plus, for each row b,
  `(x_b @ a_b) @ b_b` (the multi-adapter batch: each row's adapter is read once, `r * (in +
  out)` multiply-adds a token as for one adapter)."""
  y = project(x, w.base, in_axes, preferred_element_type)
  a, b = (p.get() if isinstance(p, stacked.LayerView) else p for p in (w.a, w.b))
  B = x.shape[0]
  if a.shape[0] != B:
    raise ValueError(f"adapters were selected for {a.shape[0]} rows, the batch has {B}")
  r = a.shape[-1]
  x3 = x.reshape(B, -1, math.prod(x.shape[x.ndim - in_axes:]))
  xa = jnp.einsum("bni,bir->bnr", x3, a.reshape(B, -1, r).astype(x.dtype))
  update = jnp.einsum("bnr,bro->bno", xa, b.reshape(B, r, -1).astype(x.dtype))
  return y + update.reshape(y.shape).astype(y.dtype)


def lookup(table, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` `[...]` of an embedding table `[V, D]` (float, or a QTensor quantized per row
  group, `quant.params.LAYOUTS["embed"]`) -> `[..., D]` in `dtype`: a quantized table
  dequantizes only the rows it reads."""
  if qtensor.is_qtensor(table):
    return qtensor.take(table, ids, dtype)
  return jnp.take(table, ids, axis=0).astype(dtype)


def project_rows(x: jax.Array, table) -> jax.Array:
  """x `[..., D]` times an embedding table `[V, D]` transposed (the tied head): `[..., V]`
  float32. On CPU at decode sizes the kernel reads a quantized table in place (`cpu_gemv`).
  Otherwise an int8 table with one scale per row contracts its integers and scales the sums
  (the float table never exists); a table in groups is dequantized next to its dot (per-group
  partial sums would be G logits-sized arrays)."""
  if cpu_gemv.applies(x, table, rows=True):
    return cpu_gemv.matmul_rows(x.reshape(-1, x.shape[-1]), table).reshape(*x.shape[:-1], -1)
  if qtensor.is_qtensor(table) and table.bits == 8 and table.num_groups == 1:
    q = table.values[..., 0].astype(jnp.float32)  # [V, Dp]
    x32 = x.astype(jnp.float32)
    dots = jnp.einsum("...d,vd->...v", jnp.pad(
        x32, [(0, 0)] * (x.ndim - 1) + [(0, q.shape[1] - table.rows)]), q)
    per_row = lambda a: a[:, 0, 0].reshape((1,) * (x.ndim - 1) + (-1,))  # [V] -> [..., V]
    if table.zeros is not None:  # sum_d x_d (q_d - z) = sum_d x_d q_d - z sum_d x_d
      dots = dots - jnp.sum(x32, axis=-1, keepdims=True) * per_row(table.zeros)
    return dots * per_row(table.scales)
  return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype),
                    preferred_element_type=jnp.float32)


def _int4_halves(x, w) -> jax.Array:
  """x `[..., I]` times an int4 QTensor `[I, O]` without unpacking into one array: each group's
  low nibbles hold its first half of rows and the high nibbles its second half, so x's columns
  split the same way and two dots read the nibbles where they lie. (Interleaving the halves back
  into one `[I, O]` array, as `dequantize` does, costs XLA:CPU about 3x the matmul.)"""
  G, g, O = w.num_groups, w.group_size, w.cols
  h = g // 2
  packed = w.values.reshape(G, h, O)
  zero = 8.0 if w.zeros is None else w.zeros[:, None, :]
  scale = w.scales[:, None, :]
  low = (((packed & 0xF).astype(jnp.float32) - zero) * scale).astype(x.dtype)
  high = (((packed >> 4).astype(jnp.float32) - zero) * scale).astype(x.dtype)
  lead = x.shape[:-1]
  xg = jnp.pad(x, [(0, 0)] * len(lead) + [(0, G * g - w.rows)]).reshape(*lead, G, 2, h)
  return (jnp.einsum("...gk,gko->...o", xg[..., 0, :], low)
          + jnp.einsum("...gk,gko->...o", xg[..., 1, :], high))
