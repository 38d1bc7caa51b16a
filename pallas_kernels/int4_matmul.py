"""Fused int4 dequantize-matmul for GPUs (Pallas Triton): x `[M, I]` @ W, W stored packed.

W is `jaxllm.quant`'s layout: uint8 `[Ip / 2, O]`, two 4-bit values per byte, group g's first
g/2 rows in the low nibbles and its last g/2 rows in the high nibbles; scales (and optional zero
points, in quantized units) `[G, O]`; w = (q - z) * s, z = 8 when no zeros are given.

One program owns a `[block_m, block_n]` output tile and walks the G groups: it loads the group's
`[g/2, block_n]` bytes once, splits them into the two row halves with a mask and a shift (so no
interleave is needed), converts them to x's dtype, and does two tensor-core dots against the
matching halves of x's columns; the group's scale multiplies the float32 partial sum. Weights
cross memory as 4 bits per value, never as a dequantized copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(*refs, g: int, num_groups: int, has_zeros: bool, split_k: int):
  if has_zeros:
    x_ref, w_ref, s_ref, z_ref, o_ref = refs
  else:
    x_ref, w_ref, s_ref, o_ref = refs
  h = g // 2
  bm, bn = o_ref.shape[-2:]
  per_split = num_groups // split_k
  first = pl.program_id(2) * per_split if split_k > 1 else 0

  def body(i, acc):
    x_low = x_ref[:, pl.ds(i * g, h)]  # [bm, h]
    x_high = x_ref[:, pl.ds(i * g + h, h)]
    packed = w_ref[pl.ds(i * h, h), :]  # [h, bn] uint8
    zero = z_ref[i, :][None, :] if has_zeros else 8.0
    low = ((packed & 0xF).astype(jnp.float32) - zero).astype(x_low.dtype)
    high = ((packed >> 4).astype(jnp.float32) - zero).astype(x_low.dtype)
    part = (jax.lax.dot(x_low, low, preferred_element_type=jnp.float32)
            + jax.lax.dot(x_high, high, preferred_element_type=jnp.float32))
    return acc + part * s_ref[i, :][None, :]

  acc = jax.lax.fori_loop(first, first + per_split, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                *, block_m: int | None = None, block_n: int = 64, num_warps: int = 4,
                num_stages: int = 3, split_k: int | None = None, interpret: bool = False) -> jax.Array:
  """x `[M, I]` (bf16/f16/f32) times the packed int4 weight -> `[M, O]` in x's dtype.

  I may be below the padded row count Ip = 2 * packed rows (a ragged last group): x is padded
  with zero columns. M is padded to the row tile (at least 16, the tensor-core minimum).
  """
  if packed.dtype != jnp.uint8 or packed.ndim != 2 or scales.ndim != 2:
    raise ValueError(f"packed {packed.shape} {packed.dtype} must be uint8 [Ip/2, O] and scales "
                     f"{scales.shape} [G, O]")
  M, I = x.shape
  half_rows, O = packed.shape
  G = scales.shape[0]
  Ip = 2 * half_rows
  if Ip % G or scales.shape[1] != O or (zeros is not None and zeros.shape != scales.shape):
    raise ValueError(f"packed {packed.shape}, scales {scales.shape}, zeros "
                     f"{None if zeros is None else zeros.shape} disagree")
  g = Ip // G
  if I > Ip or Ip - I >= g:
    raise ValueError(f"x has {I} columns; the weight holds {Ip} rows in groups of {g}")
  bm = block_m or max(16, min(64, 1 << (M - 1).bit_length()))
  Mp = -(-M // bm) * bm
  if split_k is None:
    tiles, split_k = (Mp // bm) * max(1, O // block_n), 1
    while split_k < 8 and G % (2 * split_k) == 0 and 2 * split_k * tiles <= 2 * 132:
      split_k *= 2
  if g % 32 or O % block_n or G % split_k:
    raise ValueError(f"group size {g} must be a multiple of 32, O={O} of block_n={block_n} and "
                     f"the {G} groups of split_k={split_k}")
  xp = jnp.pad(x, ((0, Mp - M), (0, Ip - I)))
  args = [xp, packed, scales.astype(jnp.float32)]
  in_specs = [pl.BlockSpec((bm, Ip), lambda i, j, k: (i, 0)),
              pl.BlockSpec((half_rows, block_n), lambda i, j, k: (0, j)),
              pl.BlockSpec((G, block_n), lambda i, j, k: (0, j))]
  if zeros is not None:
    args.append(zeros.astype(jnp.float32))
    in_specs.append(pl.BlockSpec((G, block_n), lambda i, j, k: (0, j)))
  if split_k > 1:
    out_spec = pl.BlockSpec((None, bm, block_n), lambda i, j, k: (k, i, j))
    out_shape = jax.ShapeDtypeStruct((split_k, Mp, O), jnp.float32)
  else:
    out_spec = pl.BlockSpec((bm, block_n), lambda i, j, k: (i, j))
    out_shape = jax.ShapeDtypeStruct((Mp, O), x.dtype)
  out = pl.pallas_call(
      functools.partial(_kernel, g=g, num_groups=G, has_zeros=zeros is not None,
                        split_k=split_k),
      grid=(Mp // bm, O // block_n, split_k),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="int4_matmul",
  )(*args)
  if split_k > 1:
    out = out.sum(0).astype(x.dtype)
  return out[:M]
