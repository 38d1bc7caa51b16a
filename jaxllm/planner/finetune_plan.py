"""Per-device memory plan of a fine-tuning run (`jaxllm sft` / `jaxllm dpo`), without the
base's weights: `python -m jaxllm.plan --config=experiments/sft_smollm2.py:h100-8b
--base=experiments/llama3_8b.py`.

The params are the base's shape (a checkpoint's config, or an experiment's model section)
prepared as the run prepares them (`finetune.prepare_params` under `jax.eval_shape`): every
weight for full fine-tuning, a float base plus adapters for LoRA, an int-N base plus adapters
for QLoRA. Gradients and optimizer moments cover the trainable part alone (`trainable.split`),
each split like its parameter over the mesh (`placement.qtensor_shardings`, the rules the run
uses). Activations are `plan.activation_bytes` of the run's model config (`finetune.remat`,
`finetune.compute_dtype`) and rows: a DPO or reward-model row is a pair, two sequences. DPO's reference holds
no memory while training: its log-probabilities are computed once before the first step (for
LoRA the reference is the base with the adapters off, for full training the starting weights,
which the run holds anyway). An RL run (`jaxllm rl`) trains on rl.prompts_per_step x
rl.group_size / rl.minibatches completions per update (PPO adds its value head) and holds the
rollout engine's page pool besides (`rollout_cache_bytes`, float32 k and v of
2 x rl.max_slots sequences of train.seq_len + 1 tokens: `jaxllm.rl.rollout.Sampler`'s); a full
fine-tune also keeps a copy of the starting weights as the reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from jaxllm import config as config_lib
from jaxllm.model import transformer
from jaxllm.parallel import placement, zero
from jaxllm.planner import plan as plan_lib
from jaxllm.train import finetune, optim, reward, trainable


def plan(experiment: config_lib.FinetuneExperiment, base: config_lib.ModelConfig,
         sizes: dict[str, int], command: str = "sft", *, platform: str | None = None) -> dict:
  """Per-device bytes of `experiment` fine-tuning a model shaped `base` on a mesh of `sizes`
  (data, fsdp, tensor; the others 1). `command` "dpo" or "reward" counts two sequences per
  row (a pair); "rl" counts a step's completions per update, the engine's pages and, for full
  training, the reference's copy of the weights."""
  platform = platform or jax.default_backend()
  model = finetune.model_config(base, experiment)
  sizes = {k: sizes.get(k, 1) for k in ("data", "fsdp", "tensor", "stage", "expert")}
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  _, abstract = transformer.abstract_params(model)
  prepared = jax.eval_shape(lambda p: finetune.prepare_params(p, experiment), abstract)
  axes = transformer.logical_axes(model)
  if command == "reward" or (command == "rl" and experiment.rl.algorithm == "ppo"):
    # the model and its scalar head (`jaxllm.train.reward`; PPO's value head is one too)
    prepared = jax.eval_shape(lambda p: reward.init_params(p, model.d_model), prepared)
    axes = {"model": axes, reward.HEAD: ("embed",)}
  specs = jax.tree.map(lambda s: s.spec, placement.qtensor_shardings(prepared, axes, mesh))
  train_part, _ = trainable.split(prepared)
  train_specs = trainable.trainable_like(prepared, specs)
  optimizer = optim.make_optimizer(experiment.train)
  abstract_opt = jax.eval_shape(optimizer.init, train_part)
  opt_specs = zero.optimizer_specs(optimizer, abstract_opt, train_specs, sizes, 0)
  param_bytes = plan_lib.per_device_bytes(prepared, specs, sizes)
  trainable_bytes = plan_lib.per_device_bytes(train_part, train_specs, sizes)
  if command == "rl":
    r = experiment.rl
    train = dataclasses.replace(experiment.train,
                                batch_size=r.prompts_per_step * r.group_size // r.minibatches)
  else:
    rows = 1 if command == "sft" else 2
    train = dataclasses.replace(experiment.train,
                                batch_size=experiment.train.batch_size * rows)
  run = config_lib.Config(name=experiment.name, model=model, data=config_lib.DataConfig(),
                          train=train, mesh=config_lib.MeshConfig(**sizes))
  result = {
      "config": experiment.name, "command": command, "method": experiment.finetune.method,
      "devices": math.prod(sizes.values()), "mesh": sizes,
      "params": sum(x.size for x in jax.tree.leaves(abstract)),
      "trainable_params": sum(x.size for x in jax.tree.leaves(train_part)),
      # every weight held: the base (frozen, or trained by full fine-tuning) and any adapters
      "param_bytes": param_bytes,
      "trainable_bytes": trainable_bytes,
      # gradients of the trainable part, in its dtype and sharding
      "grad_bytes": trainable_bytes,
      "optimizer_bytes": plan_lib.per_device_bytes(abstract_opt, opt_specs, sizes),
      "activation_bytes": plan_lib.activation_bytes(run, sizes, model.n_layers, platform),
      "remat": model.remat, "compute_dtype": model.dtype,
      "reference_bytes": 0.0,
  }
  if command == "rl":
    from jaxllm.inference import paging
    from jaxllm.rl import rollout
    pages = 2 * experiment.rl.max_slots * paging.pages_for(experiment.train.seq_len + 1,
                                                          rollout.PAGE_SIZE)
    kv_heads = max(model.n_kv_heads / sizes["tensor"], 1)
    result["rollout_cache_bytes"] = (2 * model.n_layers * pages * rollout.PAGE_SIZE * kv_heads
                                     * model.head_dim * 4)
    if experiment.finetune.method == "full":
      result["reference_bytes"] = param_bytes
  if experiment.finetune.method == "qlora":
    result["base_bits"] = experiment.lora.base_bits
  result["total_bytes"] = (param_bytes + result["grad_bytes"] + result["optimizer_bytes"]
                           + result["activation_bytes"] + result["reference_bytes"]
                           + result.get("rollout_cache_bytes", 0.0))
  return result


def table(result: dict) -> str:
  def gib(x):
    return f"{x / 2**30:.3f} GiB"

  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items() if v > 1) or "1 device"
  method = result["method"]
  base = "frozen, float" if method == "lora" else f"frozen, int{result.get('base_bits')}"
  rows = [
      ("config", f"{result['config']} ({result['command']}, {method}): "
                 f"{result['params'] / 1e9:.3f}B params, "
                 f"{result['trainable_params'] / 1e6:.2f}M trained"),
      ("mesh", f"{mesh} ({result['devices']} devices)"),
  ]
  if method == "full":
    rows.append(("params / device (trained)", gib(result["param_bytes"])))
  else:
    rows += [(f"base / device ({base})",
              gib(result["param_bytes"] - result["trainable_bytes"])),
             ("adapters / device", gib(result["trainable_bytes"]))]
  rows += [
      ("grads / device", gib(result["grad_bytes"])),
      ("optimizer / device", gib(result["optimizer_bytes"])),
      (f"activations (remat {result['remat']}, {result['compute_dtype']})",
       gib(result["activation_bytes"]) + " (estimate"
       + {"sft": ")", "rl": ", completions per update)"}.get(
           result["command"], ", a pair = 2 sequences)")),
  ]
  if result["command"] == "dpo":
    rows.append(("reference model", "0 (its log-probabilities are computed once before "
                 "training)"))
  if result["command"] == "rl":
    rows.append(("rollout engine pages", gib(result["rollout_cache_bytes"])))
    rows.append(("reference model", gib(result["reference_bytes"]) if result["reference_bytes"]
                 else "0 (LoRA: the base with the adapters off)"))
  rows.append(("total / device", gib(result["total_bytes"])))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
