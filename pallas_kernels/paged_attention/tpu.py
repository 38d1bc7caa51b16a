"""Paged attention for TPUs: the Pallas Mosaic lowering.

The page table and lengths are scalar-prefetched into SMEM, so each grid step's index map can
name the physical page to DMA. The pool `[N, P, K, Dh]` is viewed (for free) as `[N, P, K * Dh]`:
one block is a whole page, all KV heads, `[P, K * Dh]` (P a multiple of 8 sublanes, a contiguous
DMA), and the kernel walks the K heads with static lane slices. Grid (sequence, row block, page
slot), the page axis innermost and sequential; page slots past a sequence's end (or before its
window) keep the previous block index, so no DMA is issued for them, and their compute is
skipped. Query rows come in blocks of at most `ROW_BLOCK`: a decode step is one block, and a long
prefill chunk (512 tokens x 4 query heads per KV head = 2048 rows) keeps its q, output and
float32 accumulators within VMEM (whole, they needed 24 MiB of a 16 MiB budget: found by
compiling for a v5p with libtpu).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backends
from pallas_kernels.paged_attention import common
from pallas_kernels.paged_attention.common import Options


ROW_BLOCK = 256


def _kernel(len_ref, pt_ref, *refs, opts: Options, num_kv_heads: int, head_dim: int):
  q_ref, k_ref, v_ref, *refs = refs
  ks_ref = vs_ref = slope_ref = None
  if opts.quantized:
    ks_ref, vs_ref, *refs = refs
  if opts.has_alibi:
    slope_ref, *refs = refs
  o_ref, m_scr, l_scr, acc_scr = refs
  b, row_block, slot = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row_offset = row_block * q_ref.shape[1]
  length = len_ref[b]

  @pl.when(slot == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  lo, hi = common.page_range(length, opts)

  @pl.when((slot >= lo) & (slot < hi))
  def _step():
    for h in range(num_kv_heads):  # static lane slices of the page
      lanes = slice(h * head_dim, (h + 1) * head_dim)
      k, v = k_ref[:, lanes], v_ref[:, lanes]  # [P, Dh]
      if opts.quantized:
        k = k.astype(jnp.float32) * ks_ref[:, h:h + 1]
        v = v.astype(jnp.float32) * vs_ref[:, h:h + 1]
      m, l, acc = common.attend_page(q_ref[h], k, v, m_scr[h], l_scr[h], acc_scr[h],
                                     length=length, page_slot=slot, opts=opts,
                                     row_offset=row_offset,
                                     slopes=slope_ref[h] if opts.has_alibi else None)
      m_scr[h], l_scr[h], acc_scr[h] = m, l, acc

  @pl.when(slot == pl.num_programs(2) - 1)
  def _finish():
    for h in range(num_kv_heads):
      o_ref[h] = common.finish(l_scr[h], acc_scr[h]).astype(o_ref.dtype)


def paged_attention(q, lengths, page_table, k_pages, v_pages, k_scales, v_scales, row_slopes, *,
                    opts: Options, interpret: bool):
  """q `[B, K, R, Dh]` -> `[B, K, R, Dh]`; pages `[N, P, K, Dh]`, scales `[N, P, K]` or None;
  row_slopes `[K, R, 1]` float32 or None."""
  B, K, rows, Dh = q.shape
  N, P = k_pages.shape[:2]
  M = page_table.shape[1]
  Rb = min(rows, ROW_BLOCK)
  R = -(-rows // Rb) * Rb
  q = jnp.pad(q, ((0, 0), (0, 0), (0, R - rows), (0, 0)))

  def page_map(b, r, slot, len_ref, pt_ref):
    lo, hi = common.page_range(len_ref[b], opts)
    return pt_ref[b, jnp.minimum(jnp.maximum(slot, lo), jnp.maximum(hi - 1, lo))], 0, 0

  rows_spec = pl.BlockSpec((None, K, Rb, Dh), lambda b, r, s, *_: (b, 0, r, 0))
  page_spec = pl.BlockSpec((None, P, K * Dh), page_map)
  in_specs = [rows_spec, page_spec, page_spec]
  args = [q, k_pages.reshape(N, P, K * Dh), v_pages.reshape(N, P, K * Dh)]
  if opts.quantized:
    in_specs += [pl.BlockSpec((None, P, K), page_map)] * 2
    args += [k_scales, v_scales]
  if opts.has_alibi:  # a row block's slopes, all KV heads
    in_specs.append(pl.BlockSpec((K, Rb, 1), lambda b, r, s, *_: (0, r, 0)))
    args.append(jnp.pad(row_slopes, ((0, 0), (0, R - rows), (0, 0))))
  out = pl.pallas_call(
      functools.partial(_kernel, opts=opts, num_kv_heads=K, head_dim=Dh),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, R // Rb, M), in_specs=in_specs, out_specs=rows_spec,
          scratch_shapes=[pltpu.VMEM((K, Rb, 1), jnp.float32),
                          pltpu.VMEM((K, Rb, 1), jnp.float32),
                          pltpu.VMEM((K, Rb, Dh), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=backends.tpu_interpret_params() if interpret else False,
      name="paged_attention_tpu",
  )(lengths, page_table, *args)
  return out[:, :, :rows]
