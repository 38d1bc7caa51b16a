"""GRPO and PPO on sampled completions: advantages (group-normalised; GAE), the clipped
policy-gradient loss with its KL and value terms, and both as train-step objectives
(`jaxllm.train.step.Objective`, so `make_train_step` runs them as it runs every other loss).

A rollout batch holds N completions as rows `[N, T]` (prompt + completion, right-padded):
  inputs, targets, positions, segment_ids   as language-model batches
  weights      1 on the targets that are completion tokens (what the policy learns)
  old_logps    their log-probabilities under the params that sampled them
  ref_logps    ... under the reference (the starting model; for LoRA the base)
  advantages   GRPO: the completion's advantage on each of its tokens; PPO: GAE's
  returns, old_values   PPO: the value targets and the values at rollout time

Per completion token, with r = exp(logp - old_logp):
  policy  -min(r A, clip(r, 1 - eps, 1 + eps_high) A)
  GRPO    + beta * (exp(ref - logp) - (ref - logp) - 1)   (the k3 estimate of KL(policy || ref),
          never negative, 0 where the policy is the reference)
  PPO     + vf_coef * 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2); its KL to the reference
          is in the per-token reward instead (`ppo_token_rewards`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import RlConfig
from jaxllm.train.step import Objective
from jaxllm.train.trainable import REWARD_HEAD

INPUT_KEYS = ("inputs", "targets", "positions", "segment_ids")
# Added to a group's reward std before dividing (TRL's constant): a group of equal rewards
# gets advantages of 0, not a division by zero.
STD_EPS = 1e-4


def init_value_head(model_params: dict, d_model: int, seed: int = 0) -> dict:
  """PPO's params: `{"model": the policy's params, "score": [D]}`: the value head is a
  vector on the final hidden state (zeros: every value starts at 0), trained with the LoRA
  adapters as a reward model's head is (`jaxllm.train.trainable.REWARD_HEAD`)."""
  del seed  # a zero head: the first advantages are the rewards themselves
  return {"model": model_params, REWARD_HEAD: jnp.zeros((d_model,), jnp.float32)}


def has_value_head(params) -> bool:
  return isinstance(params, dict) and REWARD_HEAD in params and "model" in params


def policy_params(params: dict) -> dict:
  """The language model's params of a policy with or without a value head."""
  return params["model"] if has_value_head(params) else params


def policy_outputs(graphdef, params, batch: dict, temperature: float = 1.0,
                   also_at: float | None = None):
  """(log-probability of each target `[N, T]`, the entropy of its distribution `[N, T]`,
  values `[N, T]` or None without a value head), from logits / temperature, float32. With
  `also_at`, a fourth item: the targets' log-probabilities at that temperature, from the same
  forward pass."""
  model = nnx.merge(graphdef, policy_params(params))
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  values = None
  if has_value_head(params):
    logits, hidden, _ = model.logits_and_hidden(*args)
    values = hidden.astype(jnp.float32) @ params[REWARD_HEAD].astype(jnp.float32)
  else:
    logits, _ = model.forward(*args)
  logits = logits.astype(jnp.float32)

  def picked(logp_NTV):
    return jnp.take_along_axis(logp_NTV, batch["targets"][..., None], axis=-1)[..., 0]

  logp_NTV = jax.nn.log_softmax(logits / temperature, axis=-1)
  entropy = -jnp.sum(jnp.exp(logp_NTV) * logp_NTV, axis=-1)
  if also_at is None:
    return picked(logp_NTV), entropy, values
  other = logp_NTV if also_at == temperature else jax.nn.log_softmax(logits / also_at, axis=-1)
  return picked(logp_NTV), entropy, values, picked(other)


def group_advantages(rewards_PG: jax.Array, valid_PG: jax.Array, scale: bool = True
                     ) -> jax.Array:
  """GRPO's advantages `[P, G]`: each reward minus its group's mean, divided (`scale`) by the
  group's standard deviation (n - 1 in the denominator, as torch's and TRL's) + STD_EPS.
  Invalid completions (a reward that failed) are left out of their group's statistics and
  get 0."""
  valid = valid_PG.astype(jnp.float32)
  rewards = jnp.where(valid > 0, rewards_PG, 0.0)
  n = jnp.sum(valid, axis=1, keepdims=True)
  mean = jnp.sum(rewards * valid, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.square(rewards - mean) * valid, axis=1, keepdims=True) / jnp.maximum(
      n - 1.0, 1.0)
  centred = rewards - mean
  adv = centred / (jnp.sqrt(var) + STD_EPS) if scale else centred
  return adv * valid


def gae(rewards_NT: jax.Array, values_NT: jax.Array, mask_NT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) `[N, T]` by generalised advantage estimation over each row's
  completion tokens (`mask`, contiguous): delta_t = r_t + gamma V_{t+1} - V_t with V = 0 past
  the last token, A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Zero off the mask."""
  mask = mask_NT.astype(jnp.float32)
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  next_values = jnp.pad(values_NT[:, 1:], ((0, 0), (0, 1))) * next_mask
  delta = (rewards_NT + gamma * next_values - values_NT) * mask

  def back(carry_N, x):
    delta_N, next_mask_N = x
    adv_N = delta_N + gamma * lam * next_mask_N * carry_N
    return adv_N, adv_N

  _, adv_TN = jax.lax.scan(back, jnp.zeros(mask.shape[0], jnp.float32),
                           (delta.T, next_mask.T), reverse=True)
  adv = adv_TN.T * mask
  return adv, (adv + values_NT) * mask


def ppo_token_rewards(scores_N: jax.Array, old_logps: jax.Array, ref_logps: jax.Array,
                      mask_NT: jax.Array, kl_beta: float) -> jax.Array:
  """PPO's per-token rewards `[N, T]`: -kl_beta (old_logp - ref_logp) on every completion
  token, plus the completion's score on its last token."""
  mask = mask_NT.astype(jnp.float32)
  T = mask.shape[1]
  last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # each row's last completion token
  score = jax.nn.one_hot(last, T) * (scores_N * (jnp.sum(mask, axis=1) > 0))[:, None]
  return (-kl_beta * (old_logps - ref_logps) + score) * mask


def whiten(x_NT: jax.Array, mask_NT: jax.Array) -> jax.Array:
  """`x` minus its mean over the mask, over its standard deviation there (PPO's advantage
  normalisation); zero off the mask."""
  mask = mask_NT.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(x_NT * mask) / n
  var = jnp.sum(jnp.square(x_NT - mean) * mask) / n
  return (x_NT - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def clipped_token_losses(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
                         adv: jax.Array, eps_low: float, eps_high: float, kl_beta: float
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(per-token loss `[N, T]`, per-token metrics): the clipped policy-gradient loss plus
  kl_beta x the k3 KL estimate to the reference (kl_beta 0: none)."""
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = -jnp.minimum(ratio * adv, clipped * adv)
  d = ref_logp - logp
  kl = jnp.exp(d) - d - 1.0
  loss = pg + kl_beta * kl if kl_beta else pg
  was_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
  return loss, {"policy_loss": pg, "kl": kl, "ratio": ratio,
                "clip_fraction": was_clipped.astype(jnp.float32)}


def value_losses(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                 clip: float) -> jax.Array:
  """PPO's clipped value loss per token `[N, T]`."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))


def aggregate(x_NT: jax.Array, mask_NT: jax.Array, loss_type: str, max_new_tokens: int
              ) -> tuple[jax.Array, jax.Array]:
  """(sum, weight) whose ratio is the batch's loss (or metric) under `loss_type`: grpo, the
  mean over completions of each one's token mean; token, the mean over all completion tokens;
  dr_grpo, the token sum over (completions x max_new_tokens). Rows without tokens (padding)
  count 0."""
  mask = mask_NT.astype(jnp.float32)
  per_row = jnp.sum(x_NT * mask, axis=1)
  tokens = jnp.sum(mask, axis=1)
  rows = jnp.sum((tokens > 0).astype(jnp.float32))
  if loss_type == "grpo":
    return jnp.sum(per_row / jnp.maximum(tokens, 1.0)), rows
  if loss_type == "dr_grpo":
    return jnp.sum(per_row) / max_new_tokens, rows
  return jnp.sum(per_row), jnp.sum(tokens)


def loss_type_of(cfg: RlConfig) -> str:
  """How the batch's token losses are averaged: rl.loss_type for GRPO; PPO's, per token."""
  return cfg.loss_type if cfg.algorithm == "grpo" else "token"


def objective(cfg: RlConfig) -> Objective:
  """GRPO's or PPO's loss over rollout batches; metrics (averaged as the loss is): loss,
  policy_loss, kl, ratio, clip_fraction, entropy (and PPO's value_loss, value)."""
  loss_type = loss_type_of(cfg)
  eps_high = cfg.clip_eps_high or cfg.clip_eps

  def loss(graphdef, params, batch, _extra=None):
    logp, entropy, values = policy_outputs(graphdef, params, batch, cfg.temperature)
    mask = batch["weights"]
    kl_beta = cfg.kl_beta if cfg.algorithm == "grpo" else 0.0
    per_token, metrics = clipped_token_losses(logp, batch["old_logps"], batch["ref_logps"],
                                              batch["advantages"], cfg.clip_eps, eps_high,
                                              kl_beta)
    metrics["entropy"] = entropy
    if values is not None:
      vl = value_losses(values, batch["old_values"], batch["returns"], cfg.value_clip)
      per_token = per_token + cfg.vf_coef * vl
      metrics.update(value_loss=vl, value=values)
    total, weight = aggregate(per_token, mask, loss_type, cfg.max_new_tokens)
    # Dr. GRPO's metrics as GRPO's (the same weight: completions), so kl stays a mean per token
    per_metric = "grpo" if loss_type == "dr_grpo" else loss_type
    sums = {k: aggregate(v, mask, per_metric, cfg.max_new_tokens)[0]
            for k, v in metrics.items()}
    sums["loss"] = total
    return total, (weight, sums, None)

  return Objective(loss, weight_name="tokens" if loss_type == "token" else "completions")
