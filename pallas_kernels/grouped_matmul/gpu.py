"""Grouped matmul kernels for GPUs (Pallas Triton lowering).

Rows of x are sorted by group (expert) but groups are not padded to the row tile, so a tile of
`block_m` rows may hold the end of one group and the start of the next. The work list
(`api.WorkList`) names one (group, row tile) pair per item: a tile shared by two groups is
visited twice, each visit multiplying by its own group's weight and storing only its own rows
(a masked store), so no row is ever padded, copied or written twice. The rows after the last
group (padding) form a tail item that stores zeros without multiplying.

  gmm   out[r] = x[r] @ w[g(r)]          grid (items, N / block_n); loop over K
        (with `transpose_rhs`: x[r] @ w[g(r)]ᵀ, the input gradient)
  tgmm  dw[g] = x[rows of g]ᵀ @ dy[rows of g]   grid (E, K / block_k, N / block_n); loop over
        the row tiles group g touches, rows of other groups masked to zero
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _dot(a, b, *, trans_a=False, trans_b=False):
  """float32 accumulation; full float32 precision for float32 inputs (no TF32)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _gmm_kernel(item_group_ref, item_tile_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref, *,
                num_groups: int, bm: int, bk: int, num_k: int, transpose_rhs: bool):
  i = pl.program_id(0)
  g = item_group_ref[i]  # num_groups: the zero tail; num_groups + 1: no work
  m0 = pl.multiple_of(item_tile_ref[i] * bm, bm)
  gw = jnp.minimum(g, num_groups - 1)  # a valid weight index even for tail / idle items
  gm = jnp.minimum(g, num_groups)
  bn = o_ref.shape[-1]

  def body(kk, acc):
    k0 = pl.multiple_of(kk * bk, bk)
    a = x_ref[pl.ds(m0, bm), pl.ds(k0, bk)]
    if transpose_rhs:
      b = w_ref[gw, :, pl.ds(k0, bk)]  # [bn, bk]
    else:
      b = w_ref[gw, pl.ds(k0, bk), :]  # [bk, bn]
    return acc + _dot(a, b, trans_b=transpose_rhs)

  steps = jnp.where(g < num_groups, num_k, 0)
  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  rows = m0 + jnp.arange(bm, dtype=jnp.int32)
  mine = (rows >= starts_ref[gm]) & (rows < ends_ref[gm]) & (g <= num_groups)
  plgpu.store(o_ref.at[pl.ds(m0, bm), :], acc.astype(o_ref.dtype),
              mask=jnp.broadcast_to(mine[:, None], (bm, bn)))


def gmm(x, w, work, *, block_m: int, block_n: int, block_k: int, num_warps: int,
        num_stages: int, transpose_rhs: bool, interpret: bool):
  """x `[Mp, C]` (Mp a multiple of block_m) times w `[E, C, N]` (or `[E, N, C]` with
  `transpose_rhs`) per row group -> `[Mp, N]` in x's dtype."""
  Mp, C = x.shape
  E = w.shape[0]
  N = w.shape[1] if transpose_rhs else w.shape[2]
  bn, bk = block_n, block_k
  W = work.item_group.shape[0]
  w_spec = (pl.BlockSpec((E, bn, C), lambda i, j: (0, j, 0)) if transpose_rhs
            else pl.BlockSpec((E, C, bn), lambda i, j: (0, 0, j)))
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_gmm_kernel, num_groups=E, bm=block_m, bk=bk, num_k=C // bk,
                        transpose_rhs=transpose_rhs),
      grid=(W, N // bn),
      in_specs=[whole(work.item_group), whole(work.item_tile), whole(work.starts),
                whole(work.ends), pl.BlockSpec((Mp, C), lambda i, j: (0, 0)), w_spec],
      out_specs=pl.BlockSpec((Mp, bn), lambda i, j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((Mp, N), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="grouped_matmul",
  )(work.item_group, work.item_tile, work.starts, work.ends, x, w)


def _tgmm_kernel(first_ref, stop_ref, starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, bm: int):
  g = pl.program_id(0)
  start, end = starts_ref[g], ends_ref[g]

  def body(t, acc):
    m0 = pl.multiple_of(t * bm, bm)
    rows = m0 + jnp.arange(bm, dtype=jnp.int32)
    a = x_ref[pl.ds(m0, bm), :]
    a = jnp.where(((rows >= start) & (rows < end))[:, None], a, jnp.zeros_like(a))
    return acc + _dot(a, dy_ref[pl.ds(m0, bm), :], trans_a=True)

  bk, bn = o_ref.shape[-2:]
  acc = jax.lax.fori_loop(first_ref[g], stop_ref[g], body, jnp.zeros((bk, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def tgmm(x, dy, work, num_groups: int, *, block_m: int, block_n: int, block_k: int,
         num_warps: int, num_stages: int, interpret: bool, out_dtype):
  """Per group: x[rows]ᵀ @ dy[rows], x `[Mp, K]`, dy `[Mp, N]` -> `[E, K, N]` (out_dtype)."""
  Mp, K = x.shape
  N = dy.shape[1]
  bk, bn = block_k, block_n
  whole = lambda a: pl.BlockSpec(a.shape, lambda g, i, j: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=block_m),
      grid=(num_groups, K // bk, N // bn),
      in_specs=[whole(work.first_tile), whole(work.stop_tile), whole(work.starts),
                whole(work.ends), pl.BlockSpec((Mp, bk), lambda g, i, j: (0, i)),
                pl.BlockSpec((Mp, bn), lambda g, i, j: (0, j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((num_groups, K, N), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="grouped_matmul_tgmm",
  )(work.first_tile, work.stop_tile, work.starts, work.ends, x, dy)
