"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float | jax.Array = 1.0
                  ) -> jax.Array:
  """Logits with tokens outside the top-k and outside the top-p nucleus set to -inf-ish.

  top_k is static (0 = off); the nucleus keeps the smallest set of most likely tokens whose
  probability reaches top_p (the most likely token always stays).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, _NEG_INF, logits_BV)
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # The smallest logit still inside the nucleus; ties at the boundary are kept.
  inside_BV = mass_before_BV < top_p
  cutoff_B1 = jnp.min(jnp.where(inside_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cutoff_B1, _NEG_INF, logits_BV)


def sample(logits_BV: jax.Array, key: jax.Array, *, temperature: float | jax.Array = 1.0,
           top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
  """`[B]` int32 tokens; temperature <= 0 means greedy (argmax)."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  safe_t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  filtered = filter_logits(logits_BV / safe_t, top_k=top_k, top_p=top_p)
  sampled_B = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) <= 0, greedy_B, sampled_B)
