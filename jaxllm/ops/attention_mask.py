"""The masking rule of every XLA attention path, in one place: `masked_scores` (scaled
logits with causal, window, sink, segment and ALiBi masks applied by token index) and the
finite `MASK_VALUE` invisible pairs get. `jaxllm.ops.attention` (its docstring states the rule)
and `jaxllm.ops.ring_attention` (each block of the ring) both use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row (padding) gives a uniform average instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def masked_scores(q: jax.Array, k: jax.Array, *, q_index: jax.Array, kv_index: jax.Array,
                  q_segment_ids: jax.Array | None = None,
                  kv_segment_ids: jax.Array | None = None, sliding_window: int | None = None,
                  sm_scale: float | None = None, alibi_slopes: jax.Array | None = None,
                  sinks: int = 0, logit_soft_cap: float = 0.0) -> jax.Array:
  """Scaled logits `[B, K, G, T, S]` float32 of q `[B, T, H, Dh]` against k `[B, S, K, Dh]`,
  ALiBi added and invisible pairs set to the (finite) mask value: the masking rules of
  `jaxllm.ops.attention`'s docstring, shared by its XLA paths and the ring's blocks
  (`jaxllm.ops.ring_attention`)."""
  B, T, H, Dh = q.shape
  K = k.shape[2]
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  q_BTKGDh = q.reshape(B, T, K, H // K, Dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGDh, k,
                      preferred_element_type=jnp.float32) * scale
  if logit_soft_cap:
    scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
  if alibi_slopes is not None:
    distance_BTS = jnp.abs(q_index[:, :, None] - kv_index[:, None, :]).astype(jnp.float32)
    slopes_KG = jnp.asarray(alibi_slopes, jnp.float32).reshape(K, H // K)
    scores = scores - slopes_KG[None, :, :, None, None] * distance_BTS[:, None, None]
  mask_BTS = kv_index[:, None, :] <= q_index[:, :, None]
  if sliding_window is not None:
    in_window_BTS = kv_index[:, None, :] > q_index[:, :, None] - sliding_window
    mask_BTS &= in_window_BTS | (kv_index[:, None, :] < sinks)
  if q_segment_ids is not None:
    mask_BTS &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return jnp.where(mask_BTS[:, None, None], scores, MASK_VALUE)
