"""The one attention entry point used by the model.

Shapes: q `[B, T, H, Dh]`, k/v `[B, S, K, Dh]` with H a multiple of K (GQA/MQA: each group of
H/K query heads reads one K/V head; K/V are never repeated in memory).

Masking is by token index, not RoPE position, so one rule serves training and cached decoding:
query t of sequence b sits at index `q_index[b, t]` and may see key s iff
`kv_index[b, s] <= q_index[b, t]` (causal) and, when segment ids are given, both carry the same
non-padding segment. In training q_index = kv_index = arange(T); with a cache, q_index is the
slot the query's own K/V was written to and kv_index = arange(max_len). With
`sliding_window=W` a query also needs `kv_index > q_index - W` (it sees W keys, itself included).

`impl`: "xla" is the plain-jnp reference; "auto" picks the best implementation available for the
backend (only "xla" exists today; the Pallas kernels plug in here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row (padding) gives a uniform average instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_index: jax.Array,
              kv_index: jax.Array, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, sliding_window: int | None = None,
              impl: str = "auto", sm_scale: float | None = None) -> jax.Array:
  """Causal multi-head attention; returns `[B, T, H, Dh]` in q's dtype.

  q_index `[B, T]`, kv_index `[B, S]` int32; segment ids `[B, T]` / `[B, S]` int32 (0 = padding).
  """
  B, T, H, Dh = q.shape
  _, S, K, _ = k.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != Dh:
    raise ValueError(f"k {k.shape} and v {v.shape} must be [B={B}, S, K, Dh={Dh}]")
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if impl not in ("auto", "xla"):
    raise ValueError(f"unknown attention impl {impl!r} (available: auto, xla)")
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  q_BTKGDh = q.reshape(B, T, K, H // K, Dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGDh, k,
                      preferred_element_type=jnp.float32) * scale
  mask_BTS = kv_index[:, None, :] <= q_index[:, :, None]
  if sliding_window is not None:
    mask_BTS &= kv_index[:, None, :] > q_index[:, :, None] - sliding_window
  if q_segment_ids is not None:
    mask_BTS &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  scores = jnp.where(mask_BTS[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(B, T, H, Dh).astype(q.dtype)
