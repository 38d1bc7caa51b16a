"""Paged attention for GPUs: the Pallas Triton lowering.

One program per (sequence, KV head) holds the G * T query rows that read that head, walks the
sequence's pages through the page table (one `[page_size, Dh]` tile per step, read in place from
the `[N, P, K, Dh]` pool) and keeps the online-softmax state in registers. int8 pages are
dequantized per tile with their `[N, P, K]` scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import common
from pallas_kernels.paged_attention.common import Options


def _kernel(*refs, opts: Options):
  q_ref, len_ref, pt_ref, k_ref, v_ref, *refs = refs
  ks_ref = vs_ref = slope_ref = None
  if opts.quantized:
    ks_ref, vs_ref, *refs = refs
  if opts.has_alibi:
    slope_ref, *refs = refs
  (o_ref,) = refs
  q = q_ref[...]  # [R, Dh]
  slopes = slope_ref[...] if opts.has_alibi else None  # [R, 1]
  length = len_ref[...]
  lo, hi = common.page_range(length, opts)

  def body(slot, carry):
    page = pt_ref[slot]
    k, v = k_ref[page, :, :], v_ref[page, :, :]  # [P, Dh]
    if opts.quantized:
      k = k.astype(jnp.float32) * ks_ref[page, :][:, None]
      v = v.astype(jnp.float32) * vs_ref[page, :][:, None]
    return common.attend_page(q, k, v, *carry, length=length, page_slot=slot, opts=opts,
                              slopes=slopes)

  R, Dh = q.shape
  init = (jnp.full((R, 1), common.MASK_VALUE, jnp.float32), jnp.zeros((R, 1), jnp.float32),
          jnp.zeros((R, Dh), jnp.float32))
  _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  o_ref[...] = common.finish(l, acc).astype(o_ref.dtype)


def paged_attention(q, lengths, page_table, k_pages, v_pages, k_scales, v_scales, row_slopes, *,
                    opts: Options, num_warps: int | None, interpret: bool):
  """q `[B, K, R, Dh]` -> `[B, K, R, Dh]`; pages `[N, P, K, Dh]`, scales `[N, P, K]` or None;
  row_slopes `[K, R, 1]` float32 or None."""
  B, K, R, Dh = q.shape
  N, P = k_pages.shape[:2]
  M = page_table.shape[1]
  page_spec = pl.BlockSpec((N, P, None, Dh), lambda b, h: (0, 0, h, 0))
  in_specs = [pl.BlockSpec((None, None, R, Dh), lambda b, h: (b, h, 0, 0)),
              pl.BlockSpec((None,), lambda b, h: (b,)),
              pl.BlockSpec((None, M), lambda b, h: (b, 0)), page_spec, page_spec]
  args = [q, lengths, page_table, k_pages, v_pages]
  if opts.quantized:
    in_specs += [pl.BlockSpec((N, P, None), lambda b, h: (0, 0, h))] * 2
    args += [k_scales, v_scales]
  if opts.has_alibi:
    in_specs.append(pl.BlockSpec((None, R, 1), lambda b, h: (h, 0, 0)))
    args.append(row_slopes)
  return pl.pallas_call(
      functools.partial(_kernel, opts=opts),
      grid=(B, K),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, R, Dh), lambda b, h: (b, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=2),
      interpret=interpret,
      name="paged_attention",
  )(*args)
