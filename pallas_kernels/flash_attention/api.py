"""`flash_attention`: validates, pads to whole blocks, picks the lowering, and wires the backward.

Shapes: q `[B, T, H, Dh]`, k/v `[B, S, K, Dh]` with H a multiple of K (GQA/MQA read K/V head
h // (H / K); K/V are never repeated in memory). Query row i sits at key position i + (S - T).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.flash_attention import gpu, mosaic_gpu, tpu
from pallas_kernels.flash_attention.common import BlockSizes, Options

HEAD_DIMS = (64, 128, 256)
_LOWERINGS = {"gpu": gpu, "tpu": tpu, "mosaic_gpu": mosaic_gpu}


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None, sliding_window: int | None = None,
                    alibi_slopes: jax.Array | None = None, logit_soft_cap: float | None = None,
                    sm_scale: float | None = None, backend: str | None = None,
                    interpret: bool = False, block_sizes: BlockSizes | None = None,
                    return_lse: bool = False):
  """Blockwise online-softmax attention; returns `[B, T, H, Dh]` in q's dtype.

  causal: query i sees keys k <= i + (S - T). sliding_window=W (needs causal): keys with
  q - W < k <= q, W keys including itself, as Mistral. segment_ids `[B, T]` int32: tokens see
  only their own segment (packed sequences); the keys' are `kv_segment_ids` `[B, S]`, by default
  the same array (then T == S). alibi_slopes `[H]`: adds
  -slope_h * |q_pos - k_pos| to the logits (not differentiated). logit_soft_cap=c: logits become
  c * tanh(logits / c), before ALiBi. sm_scale defaults to Dh ** -0.5.
  backend: "gpu" (Pallas Triton) or "tpu" (Pallas Mosaic); default: the default device's.
  "mosaic_gpu" (asked for by name): the forward through Pallas Mosaic GPU (Hopper), the
  backward through Triton; bf16/f16 without segments, windows, ALiBi or soft caps.
  interpret: run the chosen lowering in the Pallas interpreter (the only way on CPU; for
  "mosaic_gpu", Mosaic GPU's own interpreter, jax >= 0.11).
  block_sizes: tiles; defaults per backend (`BlockSizes.default`). Gradients flow to q, k, v.
  return_lse: also return each row's log-sum-exp of its logits, `[B, H, T]` float32, so that
  attention over several key blocks can be merged (ring attention); gradients flow through it.
  """
  if backend != "mosaic_gpu":
    backend = backends.resolve(backend, interpret)
  elif not interpret and backends.target_platform() != "gpu":
    raise ValueError(f"backend='mosaic_gpu' runs natively on a GPU only (this is "
                     f"{backends.target_platform()!r}): pass interpret=True")
  B, T, H, Dh = _check_shapes(q, k, v)
  S, K = k.shape[1], k.shape[2]
  if sliding_window is not None and (not causal or sliding_window < 1):
    raise ValueError(f"sliding_window={sliding_window} needs causal=True and a window >= 1")
  if causal and T > S:
    raise ValueError(f"causal attention with more queries ({T}) than keys ({S}) leaves the "
                     "first queries nothing to see")
  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError("kv_segment_ids needs segment_ids for the queries")
  if segment_ids is not None and kv_segment_ids is None:
    if T != S:
      raise ValueError(f"segment_ids alone need T == S (got {T} queries, {S} keys): pass the "
                       "keys' as kv_segment_ids")
    kv_segment_ids = segment_ids
  if segment_ids is not None and (segment_ids.shape != (B, T)
                                  or kv_segment_ids.shape != (B, S)):
    raise ValueError(f"segment_ids {segment_ids.shape} / kv_segment_ids {kv_segment_ids.shape} "
                     f"must be [B={B}, T={T}] / [B={B}, S={S}]")
  if alibi_slopes is not None and alibi_slopes.shape != (H,):
    raise ValueError(f"alibi_slopes {alibi_slopes.shape} must be [H={H}]")
  if logit_soft_cap is not None and logit_soft_cap <= 0:
    raise ValueError(f"logit_soft_cap={logit_soft_cap} must be positive")
  opts = Options(T=T, S=S, groups=H // K, causal=causal, sliding_window=sliding_window,
                 logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
                 sm_scale=float(Dh ** -0.5 if sm_scale is None else sm_scale),
                 has_segments=segment_ids is not None, has_alibi=alibi_slopes is not None)
  if backend == "mosaic_gpu":
    reason = mosaic_gpu.supports(opts, q.dtype, Dh)
    if reason:
      raise ValueError(f"backend='mosaic_gpu' does not take {reason}: use backend='gpu' "
                       "(Triton)")
    default = mosaic_gpu.default_block_sizes(Dh)
  else:
    default = BlockSizes.default(backend, Dh)
  bs = _fit_blocks(block_sizes or default, backend, T, S)
  q_seg = k_seg = slopes = None
  if segment_ids is not None:
    # Padding rows and keys get segments no real token has (and that differ from each other).
    q_seg = _pad(segment_ids.astype(jnp.int32), 1, bs.q_multiple, -1)
    k_seg = _pad(kv_segment_ids.astype(jnp.int32), 1, bs.k_multiple, -2)
  if alibi_slopes is not None:
    slopes = jax.lax.stop_gradient(alibi_slopes.astype(jnp.float32))
  out, lse = _flash(_pad(q, 1, bs.q_multiple), _pad(k, 1, bs.k_multiple),
                    _pad(v, 1, bs.k_multiple), q_seg, k_seg, slopes, opts, backend,
                    bool(interpret), bs)
  return (out[:, :T], lse[..., :T]) if return_lse else out[:, :T]


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"q {q.shape} must be [B, T, H, Dh] and k {k.shape}, v {v.shape} the same "
                     "[B, S, K, Dh]")
  B, T, H, Dh = q.shape
  if k.shape[0] != B or k.shape[3] != Dh:
    raise ValueError(f"k/v {k.shape} must share batch {B} and head_dim {Dh} with q {q.shape}")
  if H % k.shape[2]:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {k.shape[2]}")
  if Dh not in HEAD_DIMS:
    raise ValueError(f"head_dim {Dh} is not supported (one of {HEAD_DIMS})")
  if q.dtype != k.dtype or k.dtype != v.dtype or q.dtype not in (jnp.float32, jnp.bfloat16,
                                                                  jnp.float16):
    raise ValueError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must match and be a float type")
  return B, T, H, Dh


class _Fitted(BlockSizes):
  """BlockSizes shrunk to the problem, with the multiples T and S are padded to."""

  @property
  def q_multiple(self) -> int:
    return math.lcm(self.block_q, self.bwd[0])

  @property
  def k_multiple(self) -> int:
    return math.lcm(self.block_k, self.bwd[1])


def _fit_blocks(bs: BlockSizes, backend: str, T: int, S: int) -> _Fitted:
  """Shrinks tiles larger than the (rounded-up) sequence, so short inputs are not padded to 128."""
  triton = backend in ("gpu", "mosaic_gpu")  # mosaic_gpu's backward is Triton's

  def fit(block, length):
    if triton:  # Triton tiles are powers of two, at least 16 for tensor-core dots
      return min(block, max(16, 1 << (length - 1).bit_length()))
    return min(block, -(-length // 8) * 8)

  requested = dict(block_q=bs.block_q, block_k=bs.block_k, block_q_bwd=bs.bwd[0],
                   block_k_bwd=bs.bwd[1])
  for name, value in requested.items():
    if value < 1 or (triton and value & (value - 1)):
      raise ValueError(f"{name}={value}: GPU tiles must be powers of two")
  if backend == "mosaic_gpu":
    mosaic_gpu.check_block_sizes(bs.block_q, bs.block_k)
    forward = dict(block_q=bs.block_q, block_k=bs.block_k)  # whole wgmma tiles: pad, never shrink
  else:
    forward = dict(block_q=fit(bs.block_q, T), block_k=fit(bs.block_k, S))
  sizes = dict(**forward, block_q_bwd=fit(bs.bwd[0], T), block_k_bwd=fit(bs.bwd[1], S),
               num_warps=bs.num_warps, num_stages=bs.num_stages)
  fitted = _Fitted(**sizes)
  if backend == "tpu":
    tpu.check_block_sizes(fitted, T, S)
  return fitted


def _pad(x, axis, multiple, value=0):
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_seg, k_seg, slopes, opts, backend, interpret, bs):
  """-> (out `[B, Tp, H, Dh]`, lse `[B, H, Tp]` float32) of the padded inputs."""
  return _LOWERINGS[backend].forward(q, k, v, q_seg, k_seg, slopes, opts=opts, bs=bs,
                                     interpret=interpret)


def _flash_fwd(q, k, v, q_seg, k_seg, slopes, opts, backend, interpret, bs):
  out, lse = _LOWERINGS[backend].forward(q, k, v, q_seg, k_seg, slopes, opts=opts, bs=bs,
                                         interpret=interpret)
  return (out, lse), (q, k, v, q_seg, k_seg, slopes, out, lse)


def _flash_bwd(opts, backend, interpret, bs, residuals, cotangents):
  q, k, v, q_seg, k_seg, slopes, out, lse = residuals
  do, dlse = cotangents
  # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax Jacobian's row term, `[B, H, Tp]`.
  # lse_i's own gradient is P_ij, so a cotangent on it adds P_ij dlse_i to dS_ij: the kernels'
  # dS = P (dP - delta) with delta lowered by dlse, no second pass.
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32)) - dlse
  dq, dk, dv = _LOWERINGS[backend].backward(q, k, v, q_seg, k_seg, slopes, lse, delta, do,
                                            opts=opts, bs=bs, interpret=interpret)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

