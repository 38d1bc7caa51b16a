"""Per-device memory plan of a training config, without allocating the model.

Parameter, gradient and optimizer-state bytes come from abstract evaluation (`jax.eval_shape`)
and the sharding rules applied to the configured mesh shape, so any mesh can be planned on a
laptop. Activation bytes are an estimate from the shapes and the remat policy (below). When the
mesh fits the local devices, the compiled train step's own memory analysis is reported beside it.

Activation estimate, per token of the local microbatch, per layer (c = compute dtype bytes,
heads and mlp divided by mesh.tensor):
  remat none           c * (4 D + 2 (H + K) Dh + 3 F) (+ 4 H T for XLA's materialised softmax)
  remat dots*          c * (2 D + (2 H + 2 K) Dh + 2 F)   matmul outputs only
  remat full           c * D                               the layer input; one layer recomputed
  remat offload_dots   as full on the device (the matmul outputs wait in host memory)
  remat_every N        the policy's figure on 1 layer in N, remat none's on the others
plus the float32 logits and their gradient (8 V / tensor bytes per token). Under mesh.stage > 1
GPipe and circular keep every microbatch's activations until the flush (times m); 1F1B keeps
one microbatch's, its stash of stage inputs (`pipeline_1f1b.stash_size`, 4 D bytes per token
each) and the batch's inputs and input cotangents (8 D bytes per token of the whole batch). In an MoE layer the
MLP's 3 F becomes each token's k expert slots, 3 k F (+ 3 F_shared for shared experts), plus
the dispatch copies: the sorted token rows and their outputs, 2 k D (F over mesh.tensor).

MoE models also report: total and active parameters (the experts' weights count k / E towards
the active ones, shared experts fully), the expert weights' bytes per device, and the
all-to-all buffers of one MoE layer per device under mesh.expert = P > 1 (compute dtype): the
dropless exchange sends and receives [P, S, D] (S = local tokens x k: a device may send every
slot to one peer) there and back, four such buffers; capacity mode four [E, C, D] buffers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm.model import transformer
from jaxllm.ops import attention as attention_ops
from jaxllm.parallel import pipeline, pipeline_1f1b, rules, zero
from jaxllm.train import optim


@dataclasses.dataclass(frozen=True)
class _MeshShape:
  """Just enough of a Mesh for `rules.spec_for`: the axis sizes."""
  shape: dict


# TPU memory is handed out in whole granules: a scalar takes 512 bytes. (Arrays whose minor
# dimensions are not multiples of the (8, 128) tile pad further; not modelled.)
TPU_GRANULE_BYTES = 512


def per_device_bytes(abstract_tree, spec_tree, sizes, granule: int = 1) -> float:
  total = 0.0
  for x, spec in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      spec_tree, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    shards = 1
    for entry in spec:
      for axis in (entry,) if isinstance(entry, str) else (entry or ()):
        shards *= sizes[axis]
    local = x.size * x.dtype.itemsize / shards
    total += -(-local // granule) * granule if granule > 1 else local
  return total


def _argument_bytes(cfg, sizes, params, param_specs, opt, opt_specs, granule: int) -> float:
  """Per-device bytes of the train step's inputs in device memory: the state (params, optimizer
  state unless it is offloaded to the host, step and rng) and one global batch of five `[B, T]`
  32-bit arrays split over the batch shards."""
  P = jax.sharding.PartitionSpec
  scalars = {"step": jax.ShapeDtypeStruct((), jnp.int32),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  if config_lib.loss_scaling_on(cfg):  # the dynamic loss scale's state
    scalars["scale"] = jax.ShapeDtypeStruct((), jnp.float32)
    scalars["good_steps"] = jax.ShapeDtypeStruct((), jnp.int32)
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  batch = [jax.ShapeDtypeStruct((cfg.train.batch_size // shards, cfg.train.seq_len), jnp.int32)
           ] * 5
  return (per_device_bytes(params, param_specs, sizes, granule)
          + (0 if cfg.train.offload_optimizer else per_device_bytes(opt, opt_specs, sizes,
                                                                      granule))
          + per_device_bytes(scalars, {k: P() for k in scalars}, sizes, granule)
          + per_device_bytes(batch, [P()] * 5, sizes, granule))


def activation_bytes(cfg: config_lib.Config, sizes: dict, layers_per_stage: int,
                     platform: str) -> float:
  m, t = cfg.model, cfg.train
  c = jnp.dtype(m.dtype).itemsize
  tp = sizes["tensor"]
  H, K, F = m.n_heads / tp, max(m.n_kv_heads / tp, 1), m.d_ff / tp
  D, Dh, T = m.d_model, m.head_dim, t.seq_len
  micro = t.batch_size / t.grad_accum / (sizes["data"] * sizes["fsdp"])
  micro /= max(t.microbatches, 1) if sizes["stage"] > 1 else 1
  layout = transformer.layer_layout(m)
  if m.n_experts:  # average the MLP width over dense and MoE layers
    moe_width = (3 * m.experts_per_token * (m.moe_d_ff or m.d_ff) + 2 * m.experts_per_token * D
                 + 3 * m.n_shared_experts * (m.moe_d_ff or m.d_ff)) / tp
    F = (layout.n_dense * 3 * F + layout.groups * moe_width) / m.n_layers / 3
  # Sequence parallelism splits the residual stream (the norms' inputs and outputs, the D-wide
  # terms) over the tensor axis too.
  Dr = D / tp if cfg.mesh.sequence_parallel else D
  none_layer = c * (4 * Dr + 2 * (H + K) * Dh + 3 * F)  # everything a layer saves
  if m.remat in ("full", "offload_dots"):  # offload: the dots wait in host memory instead
    per_token_layer = c * Dr
    recompute = none_layer  # one layer live during its backward
  elif m.remat in ("dots", "dots_no_batch"):
    per_token_layer, recompute = c * (2 * Dr + (2 * H + 2 * K) * Dh + 2 * F), 0.0
  else:
    per_token_layer, recompute = none_layer, 0.0
  N = m.remat_every  # the policy on every N-th layer, nothing saved-only on the others
  per_token_layer = (per_token_layer + (N - 1) * none_layer) / N
  context = sizes.get("context", 1)
  impl = attention_ops.resolve_impl(m.attention_impl, m.head_dim, platform)
  ring = context > 1 and t.context_parallel == "ring"
  ring_flash = ring and attention_ops.ring_runs_flash(impl, m.sliding_window or None,
                                                      m.position_encoding == "alibi")
  # Context parallelism runs the XLA attention (the kernel sees whole sequences), except a ring
  # whose blocks the flash kernel can take.
  xla_attention = (context > 1 and not ring_flash) or impl == "xla"
  transient = 0.0
  if ring_flash:
    # No scores; each of the C ring steps keeps its block's output (the kernel's residual, and
    # the float32 copy the log-sum-exp merge differentiates through) and lse for the backward.
    outputs = context * (c + 4) * H * Dh
    if m.remat == "none":
      per_token_layer += outputs
    else:
      transient += outputs
  if xla_attention:
    # float32 [T] rows of scores per head and query. Counted from XLA's buffer assignment
    # (`python -m jaxllm.bench context`, CPU, 1-3 layers, seq 512-2048): without remat each
    # layer keeps three (the scores and softmax's intermediates) and one layer's backward adds
    # two; remat=dots keeps one (the score matmul's output) and the backward rebuilds four;
    # remat=full keeps none and rebuilds four, a layer at a time. Ring attention recomputes its
    # blocks in the backward (jax.checkpoint) and keeps none; about five rows' worth of its
    # blocks are live at once.
    scores = 4 * H * T
    saved, transient = {"none": (3, 2), "full": (0, 4), "offload_dots": (0, 4)}.get(m.remat,
                                                                                (1, 4))
    if context > 1 and t.context_parallel == "ring":
      saved, transient = 0, 5
    per_token_layer += (saved + (N - 1) * 3) / N * scores
    transient *= scores
  micro /= sizes["expert"]  # the expert axis splits the batch too
  # Context parallelism: each device keeps 1/context of every row's tokens, and per layer the
  # whole row's gathered K/V (held for the backward pass); attention still spans all T keys.
  tokens = micro * T / context
  gathered_kv = c * 2 * K * Dh * micro * T * layers_per_stage if context > 1 else 0.0
  in_flight = 1
  logits = 8 * m.vocab_size / tp * tokens
  if sizes["stage"] > 1 and config_lib.pipeline_schedule(t) == "1f1b":
    # One microbatch's activations at a time (its backward recomputes them from the stashed
    # stage input); the stash of float32 stage inputs, and the batch's inputs and their
    # cotangents ([B, T, D] float32 each); whole-vocab logits of one microbatch.
    mb = max(t.microbatches, 1)
    stash = pipeline_1f1b.stash_size(sizes["stage"], mb) * tokens * 4 * D
    return (tokens * (per_token_layer * layers_per_stage + recompute) + gathered_kv + stash
            + 2 * mb * tokens * 4 * D + tokens * transient + 8 * m.vocab_size * tokens)
  if sizes["stage"] > 1:  # GPipe keeps every microbatch's activations until the flush
    in_flight = max(t.microbatches, 1)
  return (tokens * (per_token_layer * layers_per_stage + recompute) + gathered_kv) * in_flight + (
      tokens * transient + logits)


def plan(cfg: config_lib.Config, num_devices: int, *, compile_check: bool = True,
         platform: str | None = None) -> dict:
  """The per-device memory plan (bytes) of `cfg` on `num_devices` devices of `platform`
  (default: this machine's; it decides the attention kernel, and "tpu" counts its allocation
  granule in `argument_bytes`)."""
  platform = platform or jax.default_backend()
  sizes = config_lib.resolve_mesh_shape(cfg.mesh, num_devices)
  mesh = _MeshShape(sizes)
  _, abstract_params = transformer.abstract_params(cfg.model)
  axes = transformer.logical_axes(cfg.model)
  param_specs = jax.tree.map(lambda a, x: rules.spec_for(a, x.shape, mesh), axes,
                             abstract_params, is_leaf=lambda x: isinstance(x, tuple))
  optimizer = optim.make_optimizer(cfg.train)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_specs = zero.optimizer_specs(optimizer, abstract_opt, param_specs, sizes,
                                   cfg.mesh.zero_stage)
  grad_specs = zero.gradient_specs(abstract_params, param_specs, sizes, cfg.mesh.zero_stage)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  stage = sizes["stage"]
  layers_per_stage = math.ceil(cfg.model.n_layers / stage)
  # The stacked layers' leading axis is `layers` -> `stage`, so the rules split them over stages.
  params = per_device_bytes(abstract_params, param_specs, sizes)
  result = {
      "config": cfg.name, "devices": num_devices, "mesh": sizes, "params": n_params,
      "param_bytes": params,
      # gradients take the params' dtype and sharding (ZeRO-2: the moments' sharding)
      "grad_bytes": per_device_bytes(abstract_params, grad_specs, sizes),
      "zero_stage": cfg.mesh.zero_stage,
      "optimizer_bytes": per_device_bytes(abstract_opt, opt_specs, sizes),
      "activation_bytes": activation_bytes(cfg, sizes, layers_per_stage, platform),
      "remat": cfg.model.remat,
      "microbatches": cfg.train.microbatches,
  }
  granule = TPU_GRANULE_BYTES if platform == "tpu" else 1
  result["argument_bytes"] = _argument_bytes(cfg, sizes, abstract_params, param_specs,
                                             abstract_opt, opt_specs, granule)
  result["state_bytes_per_param"] = (result["param_bytes"] + result["grad_bytes"]
                                     + result["optimizer_bytes"]) / n_params
  # A checkpoint holds the parameters and the optimizer state once; before an asynchronous
  # save returns, each device's share of them is copied into its host's memory.
  result["checkpoint_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      (abstract_params, abstract_opt)))
  result["checkpoint_bytes_per_device"] = result["param_bytes"] + result["optimizer_bytes"]
  if cfg.model.n_experts:
    result["moe"] = _moe_plan(cfg, sizes, abstract_params, param_specs)
  # Offloaded, the optimizer state waits in host memory and visits the device leaf by leaf
  # for the update (estimate: its largest leaf at a time).
  opt_on_device = result["optimizer_bytes"]
  result["host_argument_bytes"] = 0.0
  if cfg.train.offload_optimizer:
    result["host_argument_bytes"] = per_device_bytes(abstract_opt, opt_specs, sizes, granule)
    opt_on_device = max(per_device_bytes([x], [s], sizes) for x, s in zip(
        jax.tree.leaves(abstract_opt), jax.tree.leaves(
            opt_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))))
  result["total_bytes"] = (result["param_bytes"] + result["grad_bytes"]
                           + opt_on_device + result["activation_bytes"])
  m = max(cfg.train.microbatches, 1)
  v = cfg.train.pipeline_chunks
  # 1F1B (one chunk per stage) has GPipe's bubble: its idle slots skip their work.
  result["bubble"] = {"gpipe": pipeline.bubble_fraction(stage, m),
                      "configured": pipeline.bubble_fraction(stage, m, v),
                      "schedule": (config_lib.pipeline_schedule(cfg.train) if v == 1
                                   else f"circular x{v}")}
  result["compiled"] = None
  # Host offload has no host memory to go to on CPU: nothing local to compile it for.
  offloads = cfg.train.offload_optimizer or cfg.model.remat == "offload_dots"
  local_cpu = jax.default_backend() == "cpu"
  if (compile_check and stage == 1 and num_devices <= jax.device_count()
      and not (offloads and local_cpu)):
    from jaxllm.planner import aot
    compiled = aot.compile_train_step(cfg, jax.devices()[:num_devices])
    result["compiled"] = compiled if "argument_bytes" in compiled else None
  return result


def _moe_plan(cfg: config_lib.Config, sizes: dict, abstract_params, param_specs) -> dict:
  """Expert weights, active parameters and all-to-all buffers (module docstring)."""
  m, t = cfg.model, cfg.train
  experts = {k: v for k, v in abstract_params["moe_blocks"]["moe"].items()
             if k in ("gate", "up", "down")}
  expert_params = sum(x.size for x in jax.tree.leaves(experts))
  total = sum(x.size for x in jax.tree.leaves(abstract_params))
  active = total - expert_params + expert_params * m.experts_per_token / m.n_experts
  specs = {k: param_specs["moe_blocks"]["moe"][k] for k in experts}
  P = sizes["expert"]
  c = jnp.dtype(m.dtype).itemsize
  local_tokens = (t.batch_size / t.grad_accum / max(t.microbatches if sizes["stage"] > 1 else 1,
                                                    1)
                  / (sizes["data"] * sizes["fsdp"] * P) * t.seq_len)
  slots = local_tokens * m.experts_per_token
  if P == 1:
    buffers = 0.0
  elif m.capacity_factor > 0:
    from jaxllm.model import moe
    C = moe.capacity(int(local_tokens), m.experts_per_token, m.n_experts, m.capacity_factor)
    buffers = 4 * m.n_experts * C * m.d_model * c
  else:
    buffers = 4 * P * slots * m.d_model * c
  return {"experts": m.n_experts, "experts_per_token": m.experts_per_token,
          "moe_layers": transformer.layer_layout(m).groups, "total_params": total,
          "active_params": active, "expert_params": expert_params,
          "expert_param_bytes": per_device_bytes(experts, specs, sizes),
          "all_to_all_bytes_per_layer": buffers,
          "dispatch": "capacity" if m.capacity_factor > 0 else "dropless"}


def table(result: dict) -> str:
  def gib(x):
    return f"{x / 2**30:.3f} GiB"

  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items() if v > 1) or "1 device"
  rows = [
      ("config", f"{result['config']}: {result['params'] / 1e9:.3f}B params"),
      ("mesh", f"{mesh} ({result['devices']} devices)"),
      ("params / device", gib(result["param_bytes"])),
      ("grads / device", gib(result["grad_bytes"])),
      ("optimizer / device", gib(result["optimizer_bytes"])
       + (f" (ZeRO-{result['zero_stage']} over data)" if result["zero_stage"] else "")
       + (" in host memory" if result["host_argument_bytes"] else "")),
      ("state bytes / param", f"{result['state_bytes_per_param']:.2f} (per device)"),
      (f"activations (remat {result['remat']})", gib(result["activation_bytes"]) + " (estimate)"),
      ("total / device", gib(result["total_bytes"])),
      ("checkpoint", f"{gib(result['checkpoint_bytes'])} (params + optimizer state, uncompressed); "
                     f"up to {gib(result['checkpoint_bytes_per_device'])} per device copied to host "
                     "memory before an async save returns"),
  ]
  if result.get("moe"):
    e = result["moe"]
    rows.insert(1, ("experts", f"{e['experts']} ({e['experts_per_token']} per token, "
                    f"{e['moe_layers']} MoE layers, {e['dispatch']}); "
                    f"{e['active_params'] / 1e9:.3f}B of {e['total_params'] / 1e9:.3f}B params "
                    "active per token"))
    rows.insert(4, ("  of which experts", gib(e["expert_param_bytes"])))
    rows.append(("all-to-all / MoE layer", gib(e["all_to_all_bytes_per_layer"])
                 + " (send + receive, there and back)"))
  if result["mesh"]["stage"] > 1:
    b = result["bubble"]
    rows.append(("pipeline bubble", f"{b['configured']:.1%} ({b['schedule']}, "
                 f"{result['microbatches']} microbatches over {result['mesh']['stage']} stages; "
                 f"GPipe: {b['gpipe']:.1%})"))
  a = result.get("aot")
  if a:
    slices = f" x {a['slices']} slices" if a["slices"] > 1 else ""
    rows.append(("TPU target", f"{a['target']} ({a['chips']} x {a['device_kind']}, "
                 f"{a['topology']}{slices})" + (f", compiled in {a['compile_seconds']:.1f} s"
                                                if "compile_seconds" in a else "")))
  if a and "compiler_error" in a:
    rows.append(("compiled HBM / chip", f"DOES NOT FIT: {a['compiler_error']}"))
  elif a:
    rows.append(("compiled HBM / chip", f"{gib(a['peak_bytes'])} of {gib(a['hbm_bytes'])} "
                 f"({'fits' if a['fits'] else 'DOES NOT FIT'}; arguments "
                 f"{gib(a['argument_bytes'])} (plan {gib(result['argument_bytes'])}), "
                 f"temporaries {gib(a['temp_bytes'])})"))
  if result["compiled"]:
    c = result["compiled"]
    rows.append(("compiled (per device)", f"arguments {gib(c['argument_bytes'])}, temporaries "
                 f"{gib(c['temp_bytes'])}, outputs {gib(c['output_bytes'])}"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
