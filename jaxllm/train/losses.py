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
