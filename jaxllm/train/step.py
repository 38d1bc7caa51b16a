"""Pure, jittable train and eval steps.

TrainState is a plain dict pytree: {"params", "opt_state", "step" (int32 []), "rng" (uint32 [2])}.
Batches are the dicts of `jaxllm.data.pipeline` (`[B, T]` arrays).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxllm.config import TrainConfig
from jaxllm.train import losses
from jaxllm.train.optim import learning_rate_schedule

TrainState = dict[str, Any]

# optax.global_norm is deprecated in newer optax in favour of optax.tree.norm.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed)}


def _batch_loss(graphdef, params, batch, z_loss: float, microbatches: int = 1,
                pipeline_chunks: int = 1):
  logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"],
                                       microbatches=microbatches, pipeline_chunks=pipeline_chunks)
  nll, zl, weight = losses.cross_entropy_sums(logits, batch["targets"], batch["weights"], z_loss)
  return nll + zl, (nll, weight)


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    cfg: TrainConfig) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)`; accumulates `cfg.grad_accum` microbatches.

  Gradients of the summed loss are added over microbatches and divided once by the total token
  weight, so accumulation gives the same update as one large batch.
  """
  schedule = learning_rate_schedule(cfg)
  view = lambda p: p
  if cfg.qat_bits:  # quantization-aware: the forward sees rounded weights (straight-through)
    from jaxllm.quant import fake, params as qparams
    spec = qparams.QuantSpec(bits=cfg.qat_bits, group_size=cfg.qat_group_size)
    view = lambda p: fake.fake_quant_params(p, spec)
  grad_fn = jax.value_and_grad(
      lambda p, b: _batch_loss(graphdef, view(p), b, cfg.z_loss, cfg.microbatches,
                               cfg.pipeline_chunks), has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    params = state["params"]
    A = cfg.grad_accum
    if A == 1:
      (_, (nll, weight)), grads = grad_fn(params, batch)
    else:
      # Microbatch i takes rows i, i + A, ...: each keeps an equal share of every batch shard.
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1),
                           batch)

      def accumulate(carry, mb):
        g_acc, nll_acc, w_acc = carry
        (_, (nll, w)), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, w_acc + w), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, nll, weight), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
    metrics = {"loss": nll / denom, "grad_norm": _global_norm(grads),
               "lr": schedule(state["step"]), "tokens": weight}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
  """`eval_step(params, batch) -> (sum of NLL, sum of weights)`."""
  def eval_step(params, batch):
    _, (nll, weight) = _batch_loss(graphdef, params, batch, 0.0)
    return nll, weight
  return eval_step
