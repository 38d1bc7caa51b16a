"""Plain-jnp attention with every flash-attention option: the oracle the kernels are tested against.

Materialises the whole `[B, H, T, S]` score matrix in float32; differentiable by JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.common import MASK_VALUE


def attention_reference(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None,
                        sliding_window=None, alibi_slopes=None, logit_soft_cap=None,
                        sm_scale=None, return_lse=False):
  """q `[B, T, H, Dh]`, k/v `[B, S, K, Dh]` -> `[B, T, H, Dh]` in q's dtype.

  segment_ids `[B, T]` and kv_segment_ids `[B, S]` (default: segment_ids) keep segments apart.
  With `return_lse`, also the log-sum-exp of each row's logits, `[B, H, T]` float32.
  """
  B, T, H, Dh = q.shape
  S, K = k.shape[1], k.shape[2]
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  q_BTKGDh = q.reshape(B, T, K, H // K, Dh).astype(jnp.float32)
  s = jnp.einsum("btkgd,bskd->bkgts", q_BTKGDh, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  if logit_soft_cap is not None:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  q_pos = jnp.arange(T)[:, None] + (S - T)
  k_pos = jnp.arange(S)[None, :]
  if alibi_slopes is not None:
    dist = jnp.abs(q_pos - k_pos).astype(jnp.float32)
    slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, H // K, 1, 1)
    s = s - slopes * dist[None, None, None]
  visible = jnp.ones((T, S), bool)
  if causal:
    visible &= k_pos <= q_pos
  if sliding_window is not None:
    visible &= k_pos > q_pos - sliding_window
  visible = jnp.broadcast_to(visible[None], (B, T, S))
  if segment_ids is not None:
    kv_segments = segment_ids if kv_segment_ids is None else kv_segment_ids
    visible &= segment_ids[:, :, None] == kv_segments[:, None, :]
  s = jnp.where(visible[:, None, None], s, MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(B, T, H, Dh).astype(q.dtype)
  if return_lse:
    return out, jax.nn.logsumexp(s, axis=-1).reshape(B, H, T)
  return out
