"""Token-level losses. Sums, not means, so gradient accumulation can divide once at the end."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                       z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (sum of weighted NLL, sum of weighted z-loss terms, sum of weights), float32.

  z-loss (PaLM) is z_loss * log(Z)^2 per token; it keeps the softmax normaliser near 1.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll = jnp.sum((log_z_BT - target_logit_BT) * weights_BT)
  zl = jnp.sum(z_loss * jnp.square(log_z_BT) * weights_BT)
  return nll, zl, jnp.sum(weights_BT)


def distillation_sum(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array,
                     weights_BT: jax.Array, temperature: float = 1.0,
                     top_k: int = 0) -> jax.Array:
  """T² · Σ_tokens weight · KL(p_teacher || p_student), softmaxes at temperature T, float32.

  With `top_k` the teacher's distribution is its k most likely tokens renormalised, and the
  student's log-probabilities (over the whole vocabulary) are read at those tokens. No gradient
  reaches the teacher's logits.
  """
  t = jax.lax.stop_gradient(teacher_logits_BTV.astype(jnp.float32)) / temperature
  log_q = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  if top_k:
    t, idx = jax.lax.top_k(t, top_k)
    log_q = jnp.take_along_axis(log_q, idx, axis=-1)
  log_p = jax.nn.log_softmax(t, axis=-1)
  kl_BT = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature ** 2 * jnp.sum(kl_BT * weights_BT)
