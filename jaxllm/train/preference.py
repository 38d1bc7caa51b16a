"""Preference optimisation objectives: DPO, IPO and SimPO on chosen/rejected pairs.

With per-pair summed log-probabilities of the chosen and rejected replies under the policy
(pc, pr) and under the reference (qc, qr), lengths (nc, nr) in reply tokens:
  sigmoid (DPO): h = (pc - qc) - (pr - qr); loss = -(1 - e) log s(beta h) - e log s(-beta h)
                 (e = label_smoothing: conservative DPO)
  ipo:           h = (pc - qc) / nc - (pr - qr) / nr; loss = (h - 1 / (2 beta))^2
  simpo:         h = pc / nc - pr / nr; loss = -(1 - e) log s(beta h - gamma) - e log s(...)
                 (no reference)
Reference log-probabilities are computed once, before training, by `reference_logps` with the
starting params (for LoRA: the base, adapters at zero), and ride in the batch as
"reference" `[B, 2]`: no second copy of the weights and no reference forward pass per step,
for one forward pass over the training pairs up front.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import PreferenceConfig
from jaxllm.train.step import Objective

PAIR_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


def sequence_logps(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
  """(summed log-probabilities of the weighted targets, their count), each `[B, 2]`, of a
  `[B, 2, T]` pair batch."""
  B, _, T = batch["inputs"].shape
  flat = {k: batch[k].reshape(2 * B, T) for k in PAIR_KEYS}
  logits, _ = nnx.merge(graphdef, params).forward(flat["inputs"], flat["positions"],
                                                  flat["segment_ids"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(logp, flat["targets"][..., None], axis=-1)[..., 0]
  sums = jnp.sum(picked * flat["weights"], axis=-1)
  counts = jnp.sum(flat["weights"], axis=-1)
  return sums.reshape(B, 2), counts.reshape(B, 2)


def pair_losses(policy: jax.Array, reference: jax.Array, lengths: jax.Array,
                cfg: PreferenceConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss `[B]`, metrics {name: `[B]`}) from `[B, 2]` (chosen, rejected) summed policy and
  reference log-probabilities and reply lengths. Rewards are beta x the log-ratio to the
  reference (SimPO: beta x the length-averaged log-probability)."""
  n = jnp.maximum(lengths, 1.0)
  if cfg.loss == "simpo":
    rewards = cfg.beta * policy / n
  else:
    rewards = cfg.beta * (policy - reference)
  if cfg.loss == "ipo":
    ratio = (policy - reference) / n
    h = ratio[:, 0] - ratio[:, 1]
    loss = jnp.square(h - 1.0 / (2.0 * cfg.beta))
  else:
    margin = rewards[:, 0] - rewards[:, 1]
    if cfg.loss == "simpo":
      margin = margin - cfg.simpo_gamma
    e = cfg.label_smoothing
    loss = -(1.0 - e) * jax.nn.log_sigmoid(margin) - e * jax.nn.log_sigmoid(-margin)
  metrics = {"loss": loss, "reward_chosen": rewards[:, 0], "reward_rejected": rewards[:, 1],
             "reward_margin": rewards[:, 0] - rewards[:, 1],
             "reward_accuracy": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
             "logps_chosen": policy[:, 0], "logps_rejected": policy[:, 1],
             # the log-ratio to the reference per reply token, on the chosen replies: an
             # estimate of how far the policy has moved (0 for SimPO, which has no reference)
             "logratio_chosen": (policy[:, 0] - reference[:, 0]) / n[:, 0]
             if cfg.loss != "simpo" else jnp.zeros_like(loss)}
  return loss, metrics


def objective(cfg: PreferenceConfig) -> Objective:
  """The preference loss as a train-step objective over `[B, 2, T]` pair batches with
  "reference" `[B, 2]`; its weight is the number of pairs (metrics are means over pairs)."""
  def loss(graphdef, params, batch, _extra=None):
    policy, lengths = sequence_logps(graphdef, params, batch)
    losses, metrics = pair_losses(policy, batch["reference"], lengths, cfg)
    real = (lengths[:, 0] > 0).astype(jnp.float32)  # padding pairs of an eval batch count 0
    sums = {k: jnp.sum(v * real) for k, v in metrics.items()}
    return jnp.sum(losses * real), (jnp.sum(real), sums, None)
  return Objective(loss, weight_name="pairs")


def reference_logps(graphdef, params, batches: list[dict]) -> np.ndarray:
  """Summed log-probabilities `[pairs, 2]` of every pair of `batches` under `params`."""
  fn = jax.jit(lambda p, b: sequence_logps(graphdef, p, b)[0])
  return np.concatenate([np.asarray(fn(params, {k: jnp.asarray(b[k]) for k in PAIR_KEYS}))
                         for b in batches])
