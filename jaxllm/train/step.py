"""Pure, jittable train and eval steps.

TrainState is a plain dict pytree: {"params", "opt_state", "step" (int32 []), "rng" (uint32 [2])},
plus "loss_scale" when the run scales its loss (float16). The step trains
`trainable.split(params)[0]`: every weight, or a LoRA model's adapters alone (the optimizer
state is shaped by that part).
Batches are the dicts of `jaxllm.data.pipeline` (`[B, T]` arrays).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxllm.config import DistillConfig, TrainConfig, pipeline_schedule
from jaxllm.lora import adapters
from jaxllm.model import moe
from jaxllm.ops import ring_attention
from jaxllm.parallel import pipeline
from jaxllm.train import loss_scale as loss_scale_lib
from jaxllm.train import losses, trainable
from jaxllm.train.optim import learning_rate_schedule

TrainState = dict[str, Any]

# optax.global_norm is deprecated in newer optax in favour of optax.tree.norm.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def init_state(params, optimizer: optax.GradientTransformation, seed: int,
               loss_scale: float | None = None) -> TrainState:
  """A fresh train state; with `loss_scale` (float16 training) it holds the dynamic loss
  scale's state too (`jaxllm.train.loss_scale`)."""
  state = {"params": params, "opt_state": optimizer.init(trainable.trainable_params(params)),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed)}
  if loss_scale is not None:
    state["loss_scale"] = loss_scale_lib.init(loss_scale)
  return state


def load_balanced(batch: dict) -> dict:
  """The batch's `[B, T]` arrays reordered along T for ring attention on the mesh's `context`
  axis (`ring_attention.load_balance_order`; the loss is a sum over tokens, so the order does
  not change it). Unchanged without such an axis."""
  mesh = jax.sharding.get_abstract_mesh()
  C = 1 if mesh.empty else dict(mesh.shape).get("context", 1)
  if C == 1:
    return batch
  order = jnp.asarray(ring_attention.load_balance_order(batch["inputs"].shape[1], C))
  return {k: jnp.take(v, order, axis=1) for k, v in batch.items()}


def batch_loss(graphdef, params, batch, cfg: TrainConfig | None = None, teacher=None):
  """(summed loss to differentiate, (summed NLL, summed weight, MoE routing stats or None,
  summed distillation loss or None)).

  The MoE losses are means over tokens; they enter the summed loss times the batch's token
  weight, so that after the step divides by the total weight they count at their coefficients.
  `teacher` = (graphdef, params, DistillConfig): the loss becomes alpha · distillation
  (`losses.distillation_sum` against the teacher's logits on the same batch) + (1 - alpha) ·
  the hard-label loss.
  """
  microbatches, chunks = (cfg.microbatches, cfg.pipeline_chunks) if cfg else (1, 1)
  if cfg is not None and cfg.context_parallel == "ring":
    batch = load_balanced(batch)
  model = nnx.merge(graphdef, params)
  if (cfg is not None and pipeline_schedule(cfg) == "1f1b"
      and pipeline.num_stages() > 1):
    if teacher is not None:
      raise ValueError("distillation runs under the gpipe or circular pipeline schedules")

    def loss_fn(logits, targets, weights):
      nll, zl, weight = losses.cross_entropy_sums(logits, targets, weights, cfg.z_loss)
      return nll + zl, (nll, weight)
    total, (nll, weight) = model.pipeline_loss(
        batch["inputs"], batch["positions"], batch["segment_ids"], batch["targets"],
        batch["weights"], loss_fn, microbatches=microbatches)
    return total, (nll, weight, None, None)
  logits, stats = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                                microbatches=microbatches, pipeline_chunks=chunks)
  nll, zl, weight = losses.cross_entropy_sums(logits, batch["targets"], batch["weights"],
                                              cfg.z_loss if cfg else 0.0)
  total, kd = nll + zl, None
  if teacher is not None:
    t_graphdef, t_params, k = teacher
    t_logits, _ = nnx.merge(t_graphdef, t_params).forward(batch["inputs"], batch["positions"],
                                                          batch["segment_ids"])
    kd = losses.distillation_sum(logits, t_logits, batch["weights"], k.temperature, k.top_k)
    total = k.alpha * kd + (1.0 - k.alpha) * total
  if stats is not None and cfg is not None:
    aux, router_z = moe.losses(stats, model.cfg.experts_per_token)
    total = total + weight * (cfg.moe_aux_loss * aux + cfg.router_z_loss * router_z)
  return total, (nll, weight, stats, kd)


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a train step minimises: `loss(graphdef, params, batch, extra) -> (summed loss,
  (weight, summed metrics {name: []}, MoE routing stats or None))`. The step sums loss, weight
  and metrics over accumulated microbatches and divides the gradient and every metric by the
  total weight (tokens for the language-model loss, pairs for preference losses), which it
  reports as `weight_name`. `extra` is the step's third argument (a teacher's params)."""
  loss: Callable[..., tuple[jax.Array, tuple[jax.Array, dict, Any]]]
  weight_name: str = "tokens"


def lm_objective(cfg: TrainConfig | None,
                 teacher: tuple[Any, DistillConfig] | None = None) -> Objective:
  """The language-model loss (`batch_loss`): metric `loss` the NLL per token, and `kd_loss`
  with a teacher = (teacher graphdef, DistillConfig) whose params come as `extra`."""
  def loss(graphdef, params, batch, teacher_params=None):
    with_teacher = None if teacher is None else (teacher[0], teacher_params, teacher[1])
    total, (nll, weight, stats, kd) = batch_loss(graphdef, params, batch, cfg, with_teacher)
    sums = {"loss": nll} if kd is None else {"loss": nll, "kd_loss": kd}
    return total, (weight, sums, stats)
  return Objective(loss)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: TrainConfig,
                    teacher: tuple[Any, DistillConfig] | None = None, grad_shardings=None,
                    offload=None, objective: Objective | None = None, lora_dropout: float = 0.0
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)`; accumulates `cfg.grad_accum` microbatches.

  The step minimises `objective` (default: `lm_objective(cfg, teacher)`), the same way for
  every objective: gradients of the summed loss are added over microbatches and divided once by
  the total weight, so accumulation gives the same update as one large batch. With `teacher` =
  (teacher graphdef, DistillConfig) the step is `train_step(state, batch, teacher_params)`: the
  teacher runs in the same jitted step and the metrics add `kd_loss` (`loss` stays the
  student's hard-label NLL per token). `grad_shardings` (ZeRO stage 2,
  `jaxllm.parallel.zero.gradient_shardings`) pins every gradient, and the accumulated sum, to
  its shards as soon as it exists. `offload` = (device, host) shardings of an optimizer state
  kept in host memory: it is brought to the device for the update and sent back.
  `lora_dropout` > 0: each microbatch drops inputs of the LoRA adapters' path with that
  probability, masks drawn from the state's "rng" (`jaxllm.lora.adapters.with_dropout`).

  A state with "loss_scale" trains with dynamic loss scaling: the summed loss is multiplied by
  scale / tokens in the batch before differentiation and the gradients divided by that factor
  after it (the scale applies to the mean loss, as loss scales are usually given); a step with
  non-finite gradients leaves params and optimizer state as they were (metrics `skipped` 1,
  `loss_scale` the scale it ran with).
  """
  objective = objective or lm_objective(cfg, teacher)
  schedule = learning_rate_schedule(cfg)
  view = lambda p: p
  if cfg.qat_bits:  # quantization-aware: the forward sees rounded weights (straight-through)
    from jaxllm.quant import fake, params as qparams
    spec = qparams.QuantSpec(bits=cfg.qat_bits, group_size=cfg.qat_group_size)
    view = lambda p: fake.fake_quant_params(p, spec)
  def loss(t, frozen, b, extra, scale, key):
    params = adapters.with_dropout(trainable.combine(t, frozen), key, lora_dropout)
    total, aux = objective.loss(graphdef, view(params), b, extra)
    return (total if scale is None else total * scale), aux

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  pin = ((lambda g: g) if grad_shardings is None
         else (lambda g: jax.lax.with_sharding_constraint(g, grad_shardings)))

  def train_step(state: TrainState, batch: dict, extra=None) -> tuple[TrainState, dict]:
    params = state["params"]
    train_part, frozen = trainable.split(params)
    if frozen is not None and grad_shardings is not None:
      raise ValueError("ZeRO stage 2 pins full-model gradients: train LoRA adapters with "
                       "mesh.zero_stage < 2")
    scaled = "loss_scale" in state
    # The loss is a sum over the batch's tokens; the scale applies to their mean (as loss
    # scales are usually stated), so it multiplies the sum by scale / tokens.
    scale = state["loss_scale"]["scale"] / batch["inputs"].size if scaled else None
    A = cfg.grad_accum
    if A == 1:
      (_, (weight, sums, stats)), grads = grad_fn(train_part, frozen, batch, extra, scale,
                                                  state["rng"])
      grads = pin(grads)
    else:
      # Microbatch i takes rows i, i + A, ...: each keeps an equal share of every batch shard.
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1),
                           batch)

      def accumulate(carry, mb_i):
        mb, i = mb_i
        g_acc, sums_acc, w_acc = carry
        (_, (w, sums, stats)), g = grad_fn(train_part, frozen, mb, extra, scale,
                                           jax.random.fold_in(state["rng"], i))
        return ((pin(jax.tree.map(jnp.add, g_acc, pin(g))),
                 jax.tree.map(jnp.add, sums_acc, sums), w_acc + w), stats)

      first = jax.tree.map(lambda x: x[0], micro)
      sum_shapes = jax.eval_shape(
          lambda: loss(train_part, frozen, first, extra, scale, state["rng"])[1][1])
      zeros = pin(jax.tree.map(jnp.zeros_like, train_part))
      (grads, sums, weight), stats = jax.lax.scan(
          accumulate, (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes),
                       jnp.zeros((), jnp.float32)), (micro, jnp.arange(A)))
      stats = jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / (denom if scale is None else denom * scale), grads)
    old_opt_state = state["opt_state"]
    if offload is not None:
      old_opt_state = jax.device_put(old_opt_state, offload[0])
    updates, opt_state = optimizer.update(grads, old_opt_state, train_part)
    new_params = trainable.combine(optax.apply_updates(train_part, updates), frozen)
    metrics = {**{k: v / denom for k, v in sums.items()}, "grad_norm": _global_norm(grads),
               "lr": schedule(state["step"]), objective.weight_name: weight}
    if stats is not None:  # an MoE language model's params (static: merging costs nothing)
      model_cfg = nnx.merge(graphdef, params).cfg
      new_params = _update_router_bias(new_params, params, stats, model_cfg)
      metrics.update(moe_metrics(stats, model_cfg.experts_per_token))
    new_state = {"params": new_params, "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
    if scaled:
      finite = loss_scale_lib.all_finite(grads)
      new_state["params"] = loss_scale_lib.keep_if(finite, new_params, params)
      new_state["opt_state"] = loss_scale_lib.keep_if(finite, opt_state, old_opt_state)
      new_state["loss_scale"] = loss_scale_lib.adjust(state["loss_scale"], finite,
                                                      cfg.loss_scale_period)
      metrics["loss_scale"] = state["loss_scale"]["scale"]
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    if offload is not None:
      new_state["opt_state"] = jax.device_put(new_state["opt_state"], offload[1])
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
  """`eval_step(params, batch) -> (sum of NLL, sum of weights)`."""
  def eval_step(params, batch):
    _, (nll, weight, _, _) = batch_loss(graphdef, params, batch)
    return nll, weight
  return eval_step


def make_objective_eval_step(graphdef, objective: Objective
                             ) -> Callable[[Any, dict], tuple[jax.Array, dict]]:
  """`eval_step(params, batch) -> (weight, summed metrics)` of `objective` (no gradient)."""
  def eval_step(params, batch):
    _, (weight, sums, _) = objective.loss(graphdef, params, batch, None)
    return weight, sums
  return eval_step


def moe_metrics(stats: dict, k: int) -> dict[str, jax.Array]:
  """Train metrics of the MoE layers from their summed routing stats `[Lm, ...]`: the two losses
  (means over layers), per-layer load `moe_load` `[Lm, E]`, max load over the mean and load
  entropy per layer (`moe_max_load`, `moe_load_entropy` `[Lm]`) and the dropped fraction."""
  aux, router_z = moe.losses(stats, k)
  summary = moe.load_summary(stats)
  return {"moe_aux_loss": aux, "moe_z_loss": router_z, "moe_load": summary["load"],
          "moe_max_load": summary["max_load"], "moe_load_entropy": summary["entropy"],
          "moe_dropped": jnp.sum(stats["dropped"]) / jnp.maximum(jnp.sum(stats["load"]), 1.0)}


def _update_router_bias(new_params, params, stats, model_cfg):
  """Auxiliary-loss-free balancing: the routing bias takes `moe.update_router_bias`'s step from
  this batch's load (the optimizer's own update of it, from a zero gradient, is discarded)."""
  moe_params = params.get("moe_blocks", {}).get("moe", {})
  if "router_bias" not in moe_params:
    return new_params
  bias = moe.update_router_bias(moe_params["router_bias"], stats["load"],
                                model_cfg.router_bias_update_rate)
  new_params = dict(new_params)
  new_params["moe_blocks"] = dict(new_params["moe_blocks"])
  new_params["moe_blocks"]["moe"] = dict(new_params["moe_blocks"]["moe"], router_bias=bias)
  return new_params
