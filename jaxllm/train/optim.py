"""The optimizer: global-norm clipping + AdamW with warmup and cosine decay."""

from __future__ import annotations

import jax
import optax

from jaxllm.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
  """True for matrices that get weight decay; norms' scales, biases and embeddings get none."""
  def keep(path, x):
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return x.ndim >= 2 and "embed" not in names and not any(
        isinstance(n, str) and n.endswith(("norm", "bias")) for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
