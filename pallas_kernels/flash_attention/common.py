"""What both lowerings of flash attention share: options, block sizes, masks, block ranges.

Shape letters: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, Dh head dim;
`bq`/`bk` query/key block sizes. A query row r sits at key position r + (S - T).

The helpers here use only jnp ops on small 2-D tiles and integer scalars, so the same code traces
inside a Triton kernel, a Mosaic kernel, and a BlockSpec index map.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Finite, so a row whose keys are all masked stays finite (it never reaches the caller: only
# padding rows can be fully masked) and `exp(MASK - m)` underflows to exactly 0 once m is real.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. `block_q`/`block_k` for the forward and the dq pass; the dk/dv pass uses
  `block_q_bwd`/`block_k_bwd` (defaults: the forward's)."""
  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  num_warps: int | None = None  # GPU only
  num_stages: int | None = None  # GPU only

  @property
  def bwd(self) -> tuple[int, int]:
    return (self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k)

  @classmethod
  def default(cls, backend: str, head_dim: int) -> BlockSizes:
    if backend == "tpu":
      # Mosaic tiles are (8 sublanes, 128 lanes); 128-row blocks feed the MXU whole.
      return cls(block_q=128, block_k=128)
    # Triton: register pressure grows with bq * Dh; smaller tiles for wide heads. Measured on an
    # H100 (tools/tune_flash.py, docs/kernels.md): the dk/dv pass wants 64-row query tiles (with 128,
    # Dh=128 needs more shared memory than the SM has), and Dh=128 wants 32-key tiles.
    if head_dim >= 256:
      return cls(block_q=64, block_k=32, num_warps=8, num_stages=2)
    if head_dim > 64:
      return cls(block_q=128, block_k=32, block_q_bwd=64, block_k_bwd=32, num_warps=4,
                 num_stages=3)
    return cls(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
               num_stages=3)


@dataclasses.dataclass(frozen=True)
class Options:
  """Static attention options, fixed at trace time (hashable: a custom_vjp nondiff argument)."""
  T: int  # true query length (before padding to blocks)
  S: int  # true key length
  groups: int  # G = H // K
  causal: bool
  sliding_window: int | None
  logit_soft_cap: float | None
  sm_scale: float
  has_segments: bool
  has_alibi: bool

  @property
  def offset(self) -> int:
    return self.S - self.T


def scores(qk_f32: jax.Array, opts: Options, q_start, k_start, slope=None):
  """Raw q·k `[bq, bk]` (float32) -> masked-free logits, plus d(logits)/d(q·k) for backward.

  Order: scale, soft cap `cap * tanh(s / cap)`, then the ALiBi bias `-slope * |q_pos - k_pos|`.
  Returns (logits, dlogits_dqk or None when it is the constant sm_scale).
  """
  s = qk_f32 * opts.sm_scale
  dcap = None
  if opts.logit_soft_cap is not None:
    t = jnp.tanh(s / opts.logit_soft_cap)
    s = opts.logit_soft_cap * t
    dcap = (1.0 - t * t) * opts.sm_scale
  if opts.has_alibi:
    q_pos, k_pos = positions(s.shape, opts, q_start, k_start)
    s = s - slope * jnp.abs(q_pos - k_pos).astype(jnp.float32)
  return s, dcap


def positions(shape, opts: Options, q_start, k_start):
  """Key positions of a `[bq, bk]` tile: (query position `[bq, bk]`, key position `[bq, bk]`)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + q_start
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + k_start
  return rows + opts.offset, cols


def mask(shape, opts: Options, q_start, k_start, q_seg=None, k_seg=None):
  """Boolean `[bq, bk]`: key visible to query. q_seg `[bq, 1]`, k_seg `[1, bk]` when segmented."""
  q_pos, k_pos = positions(shape, opts, q_start, k_start)
  visible = k_pos < opts.S  # keys of the padded tail
  if opts.causal:
    visible &= k_pos <= q_pos
  if opts.sliding_window is not None:
    visible &= k_pos > q_pos - opts.sliding_window
  if opts.has_segments:
    visible &= q_seg == k_seg
  return visible


def kv_block_range(q_block, block_q: int, block_k: int, num_k_blocks: int, opts: Options):
  """[lo, hi) of the key blocks query block `q_block` must visit; the rest are fully masked."""
  lo = jnp.int32(0)
  hi = jnp.int32(num_k_blocks)
  last_q_pos = (q_block + 1) * block_q - 1 + opts.offset
  first_q_pos = q_block * block_q + opts.offset
  if opts.causal:
    hi = jnp.minimum(hi, jax.lax.div(jnp.maximum(last_q_pos, 0), block_k) + 1)
  if opts.sliding_window is not None:
    first_key = jnp.maximum(first_q_pos - opts.sliding_window + 1, 0)
    lo = jnp.minimum(jax.lax.div(first_key, block_k), hi)
  return lo, hi


def q_block_range(k_block, block_q: int, block_k: int, num_q_blocks: int, opts: Options):
  """[lo, hi) of the query blocks that can see key block `k_block` (the transpose of the above)."""
  lo = jnp.int32(0)
  hi = jnp.int32(num_q_blocks)
  if opts.causal:
    first_row = jnp.maximum(k_block * block_k - opts.offset, 0)
    lo = jnp.minimum(jax.lax.div(first_row, block_q), hi)
  if opts.sliding_window is not None:
    last_row = (k_block + 1) * block_k - 1 + opts.sliding_window - 1 - opts.offset
    hi = jnp.clip(jax.lax.div(jnp.maximum(last_row, 0), block_q) + 1, lo, hi)
    hi = jnp.where(last_row < 0, lo, hi)
  return lo, hi


def dot(a, b, *, trans_b=False):
  """a `[m, k]` @ b `[k, n]` (or b `[n, k]` with trans_b), float32 accumulation; full float32
  precision for float32 inputs (no TF32 / bf16 passes)."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a `[k, m]`ᵀ @ b `[k, n]`, float32 accumulation."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def split_refs(refs, opts: Options, n_main: int):
  """Kernel refs -> (the n_main leading refs, q_seg, k_seg, slopes, rest); the optional three
  are None when unused."""
  main, rest = refs[:n_main], refs[n_main:]
  q_seg = k_seg = slope = None
  if opts.has_segments:
    q_seg, k_seg, *rest = rest
  if opts.has_alibi:
    slope, *rest = rest
  return main, q_seg, k_seg, slope, rest
