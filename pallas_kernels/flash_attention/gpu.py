"""Flash attention for GPUs: the Pallas Triton lowering (forward, dq pass, dk/dv pass).

Inputs arrive padded to whole blocks (see `api.py`): q/do `[B, Tp, H, Dh]`, k/v `[B, Sp, K, Dh]`,
lse/delta `[B, H, Tp]` float32, segment ids `[B, Tp]`/`[B, Sp]` int32, ALiBi slopes `[H]` f32.
Arrays keep the model's `[B, T, H, Dh]` layout: Triton loads a `[block, Dh]` tile of one head as a
strided 2-D pointer block, so no transpose is needed.

Grid: forward and dq run one program per (batch, query head, query block) and loop over only the
key blocks their mask can reach; dk/dv runs one program per (batch, KV head, key block) and loops
over the G query heads of the group and the query blocks that can see the key block, so GQA
gradients accumulate in registers instead of through atomics or a repeated K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.common import BlockSizes, Options


def _params(bs: BlockSizes):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _optional_specs(opts: Options, q_spec, k_spec, slope_spec):
  specs = []
  if opts.has_segments:
    specs += [q_spec, k_spec]
  if opts.has_alibi:
    specs.append(slope_spec)
  return specs


def _optional_args(opts, q_seg, k_seg, slopes):
  return ([q_seg, k_seg] if opts.has_segments else []) + ([slopes] if opts.has_alibi else [])


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, opts: Options, bq: int, bk: int, nk: int):
  (q_ref, k_ref, v_ref), qseg_ref, kseg_ref, slope_ref, (o_ref, lse_ref) = common.split_refs(
      refs, opts, 3)
  i = pl.program_id(2)
  q = q_ref[...]  # [bq, Dh]
  q_seg = qseg_ref[...][:, None] if opts.has_segments else None
  slope = slope_ref[...] if opts.has_alibi else None
  lo, hi = common.kv_block_range(i, bq, bk, nk, opts)

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s, _ = common.scores(common.dot(q, k, trans_b=True), opts, i * bq, start, slope)
    k_seg = kseg_ref[pl.ds(start, bk)][None, :] if opts.has_segments else None
    s = jnp.where(common.mask(s.shape, opts, i * bq, start, q_seg, k_seg), s, common.MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + common.dot(p.astype(v.dtype), v)
    return m_new, l, acc

  Dh = q.shape[-1]
  init = (jnp.full((bq,), common.MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, Dh), jnp.float32))
  m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that visited no block (padding only)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def forward(q, k, v, q_seg, k_seg, slopes, *, opts: Options, bs: BlockSizes, interpret: bool):
  """-> (out `[B, Tp, H, Dh]`, lse `[B, H, Tp]` float32)."""
  B, Tp, H, Dh = q.shape
  Sp = k.shape[1]
  bq, bk = bs.block_q, bs.block_k
  nq, nk = Tp // bq, Sp // bk
  G = opts.groups
  in_specs = [
      pl.BlockSpec((None, bq, None, Dh), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, Sp, None, Dh), lambda b, h, i: (b, 0, h // G, 0)),
      pl.BlockSpec((None, Sp, None, Dh), lambda b, h, i: (b, 0, h // G, 0)),
  ] + _optional_specs(opts, pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                      pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0)),
                      pl.BlockSpec((None,), lambda b, h, i: (h,)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, opts=opts, bq=bq, bk=bk, nk=nk),
      grid=(B, H, nq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, Dh), lambda b, h, i: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
      compiler_params=_params(bs),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, *_optional_args(opts, q_seg, k_seg, slopes))


# ----------------------------------------------------------------------------------- backward


def _dq_kernel(*refs, opts: Options, bq: int, bk: int, nk: int):
  ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, slope_ref,
   (dq_ref,)) = common.split_refs(refs, opts, 6)
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_seg = qseg_ref[...][:, None] if opts.has_segments else None
  slope = slope_ref[...] if opts.has_alibi else None
  lo, hi = common.kv_block_range(i, bq, bk, nk, opts)

  def body(j, dq):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s, dcap = common.scores(common.dot(q, k, trans_b=True), opts, i * bq, start, slope)
    k_seg = kseg_ref[pl.ds(start, bk)][None, :] if opts.has_segments else None
    visible = common.mask(s.shape, opts, i * bq, start, q_seg, k_seg)
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    ds = p * (common.dot(do, v, trans_b=True) - delta)
    ds = ds * (opts.sm_scale if dcap is None else dcap)
    return dq + common.dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(*refs, opts: Options, bq: int, bk: int, nq: int):
  ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, slope_ref,
   (dk_ref, dv_ref)) = common.split_refs(refs, opts, 6)
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]  # [bk, Dh]
  k_seg = kseg_ref[...][None, :] if opts.has_segments else None
  k_start = j * bk
  lo, hi = common.q_block_range(j, bq, bk, nq, opts)

  def head(g, carry):
    slope = slope_ref[g] if opts.has_alibi else None

    def body(i, carry):
      dk, dv = carry
      start = pl.multiple_of(i * bq, bq)
      q = q_ref[pl.ds(start, bq), g, :]
      do = do_ref[pl.ds(start, bq), g, :]
      lse = lse_ref[g, pl.ds(start, bq)][:, None]
      delta = delta_ref[g, pl.ds(start, bq)][:, None]
      s, dcap = common.scores(common.dot(q, k, trans_b=True), opts, start, k_start, slope)
      q_seg = qseg_ref[pl.ds(start, bq)][:, None] if opts.has_segments else None
      visible = common.mask(s.shape, opts, start, k_start, q_seg, k_seg)
      p = jnp.where(visible, jnp.exp(s - lse), 0.0)  # [bq, bk]
      dv = dv + common.dot_tn(p.astype(do.dtype), do)
      ds = p * (common.dot(do, v, trans_b=True) - delta)
      ds = ds * (opts.sm_scale if dcap is None else dcap)
      dk = dk + common.dot_tn(ds.astype(q.dtype), q)
      return dk, dv

    return jax.lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, opts.groups, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, k_seg, slopes, lse, delta, do, *, opts: Options, bs: BlockSizes,
             interpret: bool):
  """-> (dq, dk, dv) shaped like q, k, v (padded); lse and delta `[B, H, Tp]` float32."""
  B, Tp, H, Dh = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = opts.groups
  extra = _optional_args(opts, q_seg, k_seg, slopes)

  bq, bk = bs.block_q, bs.block_k
  nq, nk = Tp // bq, Sp // bk
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, opts=opts, bq=bq, bk=bk, nk=nk),
      grid=(B, H, nq),
      in_specs=[
          pl.BlockSpec((None, bq, None, Dh), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, Sp, None, Dh), lambda b, h, i: (b, 0, h // G, 0)),
          pl.BlockSpec((None, Sp, None, Dh), lambda b, h, i: (b, 0, h // G, 0)),
          pl.BlockSpec((None, bq, None, Dh), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
      ] + _optional_specs(opts, pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                          pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0)),
                          pl.BlockSpec((None,), lambda b, h, i: (h,))),
      out_specs=pl.BlockSpec((None, bq, None, Dh), lambda b, h, i: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(bs),
      interpret=interpret,
      name="flash_attention_dq",
  )(q, k, v, do, lse, delta, *extra)

  bq, bk = bs.bwd
  nq, nk = Tp // bq, Sp // bk
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, opts=opts, bq=bq, bk=bk, nq=nq),
      grid=(B, K, nk),
      in_specs=[
          pl.BlockSpec((None, Tp, G, Dh), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, bk, None, Dh), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, Dh), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, Tp, G, Dh), lambda b, h, j: (b, 0, h, 0)),
          pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
      ] + _optional_specs(opts, pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
                          pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
                          pl.BlockSpec((G,), lambda b, h, j: (h,))),
      out_specs=[pl.BlockSpec((None, bk, None, Dh), lambda b, h, j: (b, j, h, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(bs),
      interpret=interpret,
      name="flash_attention_dkdv",
  )(q, k, v, do, lse, delta, *extra)
  return dq, dk, dv
