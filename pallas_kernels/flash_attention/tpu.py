"""Flash attention for TPUs: the Pallas Mosaic lowering (forward, dq pass, dk/dv pass).

Mosaic tiles the last two dimensions of every block as (8 sublanes, 128 lanes), so this lowering
works head-major: q/do `[B, H, Tp, Dh]`, k/v `[B, K, Sp, Dh]` (each block a `[rows, Dh]` tile),
row statistics `[B, H, Tp, 1]` (a sublane column that broadcasts against `[bq, bk]` scores),
query segment ids `[B, Tp, 1]` and key segment ids `[B, 1, Sp]` (a column and a row whose
comparison is the `[bq, bk]` mask), ALiBi slopes `[H]` in SMEM.

The key-block loop is the innermost, sequential ("arbitrary") grid axis, with the running max,
sum and accumulator in VMEM scratch. Blocks the mask cannot reach are skipped twice: their compute
is guarded by `pl.when`, and their index map is clamped to the nearest needed block, so the
pipeline sees an unchanged block index and issues no DMA for them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backends
from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.common import BlockSizes, Options


def check_block_sizes(bs: BlockSizes, T: int, S: int) -> None:
  """Mosaic's tiling rules: query tiles in multiples of 8 rows; key tiles in multiples of 128
  (they are the lane axis of the key segment ids) unless one tile covers every key."""
  for name, block, length, unit in (("block_q", bs.block_q, T, 8),
                                    ("block_q_bwd", bs.bwd[0], T, 8),
                                    ("block_k", bs.block_k, S, 128),
                                    ("block_k_bwd", bs.bwd[1], S, 128)):
    if block % 8 or (block % unit and block < length):
      raise ValueError(f"{name}={block}: TPU tiles must be multiples of {unit} (8 if one tile "
                       f"covers the whole length {length})")


def _clamp(x, lo, hi):
  """x clamped into [lo, hi - 1] (just lo when the range is empty)."""
  return jnp.minimum(jnp.maximum(x, lo), jnp.maximum(hi - 1, lo))


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, interpret, name, args):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=backends.tpu_interpret_params() if interpret else False,
      name=name,
  )(*args)


def _optional(opts, q_seg, k_seg, slopes, q_spec, k_spec):
  specs, args = [], []
  if opts.has_segments:
    specs += [q_spec, k_spec]
    args += [q_seg[:, :, None], k_seg[:, None, :]]
  if opts.has_alibi:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(slopes)
  return specs, args


def _query_major_specs(opts: Options, bq: int, bk: int, nk: int, Dh: int, q_seg, k_seg, slopes):
  """BlockSpecs of the (batch, head, query block, key block) grid shared by forward and dq:
  (q/out/do spec, k/v spec, row-statistics spec, optional specs, optional args). Key blocks
  outside the query block's reach are clamped to the nearest needed one (no new DMA)."""
  G = opts.groups

  def key_block(i, j):
    lo, hi = common.kv_block_range(i, bq, bk, nk, opts)
    return _clamp(j, lo, hi)

  specs, extra = _optional(opts, q_seg, k_seg, slopes,
                           pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
                           pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, key_block(i, j))))
  q_spec = pl.BlockSpec((None, None, bq, Dh), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, Dh), lambda b, h, i, j: (b, h // G, key_block(i, j), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
  return q_spec, kv_spec, row_spec, specs, extra


def _heads_major(x):
  return jnp.swapaxes(x, 1, 2)


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, opts: Options, bq: int, bk: int, nk: int):
  ((q_ref, k_ref, v_ref), qseg_ref, kseg_ref, slope_ref,
   (o_ref, lse_ref, m_scr, l_scr, acc_scr)) = common.split_refs(refs, opts, 3)
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  lo, hi = common.kv_block_range(i, bq, bk, nk, opts)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    v = v_ref[...]
    s, _ = common.scores(common.dot(q_ref[...], k_ref[...], trans_b=True), opts, i * bq, j * bk,
                         slope_ref[h] if opts.has_alibi else None)
    visible = common.mask(s.shape, opts, i * bq, j * bk,
                          qseg_ref[...] if opts.has_segments else None,
                          kseg_ref[...] if opts.has_segments else None)
    s = jnp.where(visible, s, common.MASK_VALUE)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_scr[...] = l_scr[...] * alpha + p.sum(axis=1, keepdims=True)
    acc_scr[...] = acc_scr[...] * alpha + common.dot(p.astype(v.dtype), v)
    m_scr[...] = m_new

  @pl.when(j == nk - 1)
  def _finish():
    l = l_scr[...]
    l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that visited no block (padding only)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(l_safe)


def forward(q, k, v, q_seg, k_seg, slopes, *, opts: Options, bs: BlockSizes, interpret: bool):
  """-> (out `[B, Tp, H, Dh]`, lse `[B, H, Tp]` float32)."""
  B, Tp, H, Dh = q.shape
  Sp = k.shape[1]
  bq, bk = bs.block_q, bs.block_k
  nq, nk = Tp // bq, Sp // bk
  q_spec, kv_spec, row_spec, specs, extra = _query_major_specs(opts, bq, bk, nk, Dh, q_seg,
                                                               k_seg, slopes)
  out, lse = _call(
      functools.partial(_fwd_kernel, opts=opts, bq=bq, bk=bk, nk=nk),
      grid=(B, H, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec] + specs,
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, Dh), q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)],
      scratch=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
               pltpu.VMEM((bq, Dh), jnp.float32)],
      interpret=interpret, name="flash_attention_fwd_tpu",
      args=[_heads_major(q), _heads_major(k), _heads_major(v)] + extra)
  return _heads_major(out), lse[..., 0]


# ----------------------------------------------------------------------------------- backward


def _dq_kernel(*refs, opts: Options, bq: int, bk: int, nk: int):
  ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, slope_ref,
   (dq_ref, dq_scr)) = common.split_refs(refs, opts, 6)
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  lo, hi = common.kv_block_range(i, bq, bk, nk, opts)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    k, v = k_ref[...], v_ref[...]
    s, dcap = common.scores(common.dot(q_ref[...], k, trans_b=True), opts, i * bq, j * bk,
                            slope_ref[h] if opts.has_alibi else None)
    visible = common.mask(s.shape, opts, i * bq, j * bk,
                          qseg_ref[...] if opts.has_segments else None,
                          kseg_ref[...] if opts.has_segments else None)
    p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
    ds = p * (common.dot(do_ref[...], v, trans_b=True) - delta_ref[...])
    ds = ds * (opts.sm_scale if dcap is None else dcap)
    dq_scr[...] += common.dot(ds.astype(k.dtype), k)

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkdv_kernel(*refs, opts: Options, bq: int, bk: int, nq: int):
  ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, slope_ref,
   (dk_ref, dv_ref, dk_scr, dv_scr)) = common.split_refs(refs, opts, 6)
  kh, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  g, i = t // nq, t % nq  # query head within the group, query block

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  lo, hi = common.q_block_range(j, bq, bk, nq, opts)

  @pl.when((i >= lo) & (i < hi))
  def _step():
    q, do = q_ref[...], do_ref[...]
    s, dcap = common.scores(common.dot(q, k_ref[...], trans_b=True), opts, i * bq, j * bk,
                            slope_ref[kh * opts.groups + g] if opts.has_alibi else None)
    visible = common.mask(s.shape, opts, i * bq, j * bk,
                          qseg_ref[...] if opts.has_segments else None,
                          kseg_ref[...] if opts.has_segments else None)
    p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)  # [bq, bk]
    dv_scr[...] += common.dot_tn(p.astype(do.dtype), do)
    ds = p * (common.dot(do, v_ref[...], trans_b=True) - delta_ref[...])
    ds = ds * (opts.sm_scale if dcap is None else dcap)
    dk_scr[...] += common.dot_tn(ds.astype(q.dtype), q)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, k_seg, slopes, lse, delta, do, *, opts: Options, bs: BlockSizes,
             interpret: bool):
  """-> (dq, dk, dv) shaped like q, k, v (padded); lse and delta `[B, H, Tp]` float32."""
  B, Tp, H, Dh = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = opts.groups
  qh, kh, vh, doh = (_heads_major(x) for x in (q, k, v, do))
  lse4, delta4 = lse[..., None], delta[..., None]

  bq, bk = bs.block_q, bs.block_k
  nq, nk = Tp // bq, Sp // bk
  q_spec, kv_spec, row_spec, specs, extra = _query_major_specs(opts, bq, bk, nk, Dh, q_seg,
                                                               k_seg, slopes)
  dq = _call(
      functools.partial(_dq_kernel, opts=opts, bq=bq, bk=bk, nk=nk),
      grid=(B, H, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
      scratch=[pltpu.VMEM((bq, Dh), jnp.float32)],
      interpret=interpret, name="flash_attention_dq_tpu",
      args=[qh, kh, vh, doh, lse4, delta4] + extra)

  bq, bk = bs.bwd
  nq, nk = Tp // bq, Sp // bk

  def q_map(b, h, j, t):
    lo, hi = common.q_block_range(j, bq, bk, nq, opts)
    return b, h * G + t // nq, _clamp(t % nq, lo, hi), 0

  def qseg_map(b, h, j, t):
    lo, hi = common.q_block_range(j, bq, bk, nq, opts)
    return b, _clamp(t % nq, lo, hi), 0

  specs, extra = _optional(opts, q_seg, k_seg, slopes, pl.BlockSpec((None, bq, 1), qseg_map),
                           pl.BlockSpec((None, 1, bk), lambda b, h, j, t: (b, 0, j)))
  kv_spec = pl.BlockSpec((None, None, bk, Dh), lambda b, h, j, t: (b, h, j, 0))
  dk, dv = _call(
      functools.partial(_dkdv_kernel, opts=opts, bq=bq, bk=bk, nq=nq),
      grid=(B, K, nk, G * nq),
      in_specs=[pl.BlockSpec((None, None, bq, Dh), q_map), kv_spec, kv_spec,
                pl.BlockSpec((None, None, bq, Dh), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map)] + specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
      scratch=[pltpu.VMEM((bk, Dh), jnp.float32), pltpu.VMEM((bk, Dh), jnp.float32)],
      interpret=interpret, name="flash_attention_dkdv_tpu",
      args=[qh, kh, vh, doh, lse4, delta4] + extra)
  return _heads_major(dq), _heads_major(dk), _heads_major(dv)
