"""What both paged-attention lowerings share.

Queries are regrouped per KV head: q `[B, K, R, Dh]` with rows r = t * G + g (query t of the run,
head g of the group), R padded to the tile. Query t sits at position lengths[b] - T + t.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.common import MASK_VALUE, dot


@dataclasses.dataclass(frozen=True)
class Options:
  T: int  # queries per sequence
  groups: int  # G = H // K
  page_size: int
  sm_scale: float
  sliding_window: int | None
  quantized: bool
  has_alibi: bool = False


def page_range(length, opts: Options):
  """[lo, hi) of the page slots a sequence of `length` tokens must read."""
  hi = jax.lax.div(length + opts.page_size - 1, opts.page_size)
  lo = jnp.int32(0)
  if opts.sliding_window is not None:
    first_key = jnp.maximum(length - opts.T - opts.sliding_window + 1, 0)
    lo = jnp.minimum(jax.lax.div(first_key, opts.page_size), hi)
  return lo, hi


def attend_page(q, k, v, m, l, acc, *, length, page_slot, opts: Options, row_offset=0,
                slopes=None):
  """One online-softmax step of q `[R, Dh]` over one page k/v `[P, Dh]` (float32 or bf16).

  m, l `[R, 1]`, acc `[R, Dh]` float32 -> updated (m, l, acc). `row_offset`: the index of q's
  first row among the sequence's rows (when the rows come in blocks). `slopes` `[R, 1]` float32:
  each row's ALiBi slope (with `opts.has_alibi`).
  """
  R, P = q.shape[0], k.shape[0]
  s = dot(q, k.astype(q.dtype), trans_b=True) * opts.sm_scale  # [R, P]
  rows = jax.lax.broadcasted_iota(jnp.int32, (R, P), 0) + row_offset
  k_pos = jax.lax.broadcasted_iota(jnp.int32, (R, P), 1) + page_slot * opts.page_size
  q_pos = length - opts.T + jax.lax.div(rows, opts.groups)
  if opts.has_alibi:
    s = s - slopes * (q_pos - k_pos).astype(jnp.float32)
  visible = k_pos <= q_pos
  if opts.sliding_window is not None:
    visible &= k_pos > q_pos - opts.sliding_window
  s = jnp.where(visible, s, MASK_VALUE)
  m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new)
  l = l * alpha + p.sum(axis=1, keepdims=True)
  acc = acc * alpha + dot(p.astype(q.dtype), v.astype(q.dtype))
  return m_new, l, acc


def finish(l, acc):
  return acc / jnp.where(l == 0.0, 1.0, l)
