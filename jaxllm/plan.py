"""`python -m jaxllm.plan [--config=FILE[:PRESET]] [--config.mesh.fsdp=8 ...] [--num_devices=N]
[--json] [--aot [--topology=v5p-64] [--dump_hlo=DIR]]`

Prints the per-device memory of a training config (params, grads, optimizer state,
activations under the chosen remat policy) and the pipeline bubble, without allocating the
model. Plans any device count; when the mesh fits this machine's devices it also compiles the
train step abstractly and reports the compiler's own memory analysis (`--nocompile` skips it).

A fine-tuning config (`experiments/sft_smollm2.py`, `dpo_smollm2.py`) is planned on the shape
of `--base` (a checkpoint's config, or an experiment file's model) over `--mesh` (sft's and
dpo's spec): the frozen base (float, or int-N for QLoRA), adapters, their gradients and moments,
activations (`jaxllm.planner.finetune_plan`).

`--aot` compiles the train step for the TPU slice the preset names (`--config=...:v5p-64`, or
`--topology=v5p-64`; `mesh.slices` slices of it) with libtpu's compiler on this host, no TPU
needed (`jaxllm.planner.aot`), and reports per-chip HBM from the compiled memory analysis
against the chip's capacity beside the estimate; it exits 1 with one line naming the shortfall
when the step does not fit.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jaxllm.cli import common

_CONFIG = common.define_config_flag(common.default_experiment())
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to plan for (default: this "
                                    "machine's).", lower_bound=1)
_COMPILE = flags.DEFINE_bool("compile", True, "Also compile the step for the compiler's memory "
                             "analysis when the mesh fits the local devices.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_AOT = flags.DEFINE_bool("aot", False, "Compile the train step for the preset's TPU topology "
                         "(needs libtpu: pip install 'jaxllm[tpu]').")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--aot: the TPU accelerator type (v5p-64, "
                                "v6e-256, ...); default: the --config file's preset argument.")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "--aot: write the compiled HLO to this "
                                "directory.")
_SERVE = flags.DEFINE_bool("serve", False, "--aot: compile the inference programs (prefill "
                           "chunk, decode step over the paged cache) instead, on one chip or "
                           "--serve_mesh.")
_SERVE_MESH = flags.DEFINE_string("serve_mesh", None, "--serve: split the model over the "
                                  "target's first chips, as serve --mesh does (tensor=8).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 8, "--serve: sequences decoded together (serve's "
                                  "--max_slots).", lower_bound=1)
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "--serve: tokens per sequence (default: "
                                    "the model's max_seq_len).", lower_bound=1)
_BASE = flags.DEFINE_string(
    "base", None, "Fine-tuning configs (experiments/sft_*.py, dpo_*.py): the base model whose "
    "shape is planned, a checkpoint (its config is read, not its weights) or an experiment "
    "file (FILE.py[:PRESET], its model section), e.g. experiments/llama3_8b.py.")
_MESH = flags.DEFINE_string("mesh", None, "Fine-tuning configs: the --mesh of sft/dpo "
                            "(data=2,fsdp=2,tensor=2; default: one device).")
_COMMAND = flags.DEFINE_enum("command", None, ["sft", "dpo", "reward", "rl"],
                             "Fine-tuning configs: which command's rows (dpo, reward: a pair, "
                             "two sequences; rl: a step's completions per update and the "
                             "rollout engine's pages); default: the config name's prefix "
                             "(dpo*, reward*, grpo* or ppo*: rl), else sft.")
common.define_old_spelling("serve_batch", "max_slots")
common.define_old_spelling("serve_len", "max_seq_len")


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxllm import config as config_lib
  if "finetune" in common.config_value(_CONFIG):
    _plan_finetune()
    return
  cfg = common.experiment(_CONFIG)
  import jax
  from jaxllm.planner import plan
  if _AOT.value:
    _aot(cfg)
    return
  num_devices = _NUM_DEVICES.value or jax.device_count()
  micro = cfg.train.batch_size // cfg.train.grad_accum
  sizes = config_lib.resolve_mesh_shape(cfg.mesh, num_devices)
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  if micro % shards:
    raise config_lib.ConfigError(
        f"train.batch_size / train.grad_accum = {micro} is not divisible by the "
        f"{shards} batch shards (mesh.data x mesh.fsdp x mesh.expert)")
  if sizes["expert"] > 1 and cfg.model.n_experts % sizes["expert"]:
    raise config_lib.ConfigError(f"model.n_experts={cfg.model.n_experts} is not divisible by "
                                 f"mesh.expert={sizes['expert']}")
  result = plan.plan(cfg, num_devices, compile_check=_COMPILE.value)
  print(json.dumps(result) if _JSON.value else plan.table(result))


def _plan_finetune() -> None:
  """The memory plan of a fine-tuning experiment on `--base`'s shape (`planner.finetune_plan`)."""
  from jaxllm import config as config_lib
  from jaxllm.planner import finetune_plan
  exp = config_lib.finetune_from_config_dict(common.config_value(_CONFIG))
  if not _BASE.value:
    raise common.CommandError("a fine-tuning config plans a base model: give --base (a Hugging "
                              "Face directory or an experiment file such as "
                              "experiments/llama3_8b.py)")
  from jaxllm.parallel import placement
  sizes = placement.mesh_sizes(_MESH.value) if _MESH.value else {}  # sft's and dpo's parser
  if set(sizes) - {"data", "fsdp", "tensor"}:
    raise common.CommandError(f"--mesh={_MESH.value}: give AXIS=N,... with AXIS data, fsdp "
                              "or tensor")
  base = _base_model(_BASE.value)
  shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
  if exp.train.batch_size % shards:
    raise config_lib.ConfigError(f"train.batch_size={exp.train.batch_size} is not divisible by "
                                 f"the {shards} batch shards of --mesh")
  command = _COMMAND.value or next((c for c in ("dpo", "reward") if exp.name.startswith(c)),
                                   "rl" if exp.name.startswith(("grpo", "ppo")) else "sft")
  result = finetune_plan.plan(exp, base, sizes, command)
  print(json.dumps(result) if _JSON.value else finetune_plan.table(result))


def _base_model(path: str):
  """The ModelConfig of --base: a checkpoint's (its config alone, no weights read), or the
  model section of an experiment file (FILE.py[:PRESET])."""
  import importlib.util
  import os
  from jaxllm import config as config_lib
  file, _, preset = path.partition(":")
  if file.endswith(".py"):
    if not os.path.isfile(file):
      raise common.CommandError(f"--base={path}: no such experiment file")
    spec = importlib.util.spec_from_file_location("base_experiment", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_lib.from_config_dict(module.get_config(*([preset] if preset else []))).model
  from jaxllm.checkpoint import convert
  if not os.path.exists(path):
    raise common.CommandError(f"--base={path}: no such checkpoint or experiment file")
  return convert.read_model_config(path)


def _aot(cfg) -> None:
  from ml_collections import config_flags
  from jaxllm.config import ConfigError
  from jaxllm.planner import aot, plan
  name = _TOPOLOGY.value or aot.preset_of(config_flags.get_config_filename(flags.FLAGS["config"]))
  if not name:
    raise ConfigError("--aot needs a TPU preset (--config=FILE:v5p-64) or --topology=v5p-64")
  target = aot.tpu_target(name, cfg.mesh.slices)
  if _SERVE.value:
    _aot_serving(cfg, target)
    return
  result = plan.plan(cfg, target.chips, compile_check=False, platform="tpu")
  result["aot"] = aot.compile_for_tpu(cfg, target, dump_hlo=_DUMP_HLO.value)
  print(json.dumps(result) if _JSON.value else plan.table(result))
  a = result["aot"]
  if a["fits"]:
    return
  if "compiler_error" in a:
    why = f"the TPU compiler ran out of HBM ({a['compiler_error']})"
  else:
    why = (f"the compiled step needs {a['peak_bytes'] / 2**30:.2f} GiB per chip of "
           f"{target.hbm_bytes / 2**30:.0f} GiB (short "
           f"{(a['peak_bytes'] - target.hbm_bytes) / 2**30:.2f} GiB)")
  print(f"error: {cfg.name} does not fit {target.name}: {why}", file=sys.stderr)
  sys.exit(1)


def _aot_serving(cfg, target) -> None:
  from jaxllm.planner import aot
  r = aot.compile_serving(cfg, target, batch=_MAX_SLOTS.value, max_len=_MAX_SEQ_LEN.value,
                          dump_hlo=_DUMP_HLO.value, mesh=_SERVE_MESH.value)
  def gib(x):
    return f"{x / 2**30:.3f} GiB"

  if _JSON.value:
    print(json.dumps(r))
  else:
    where = (f"one {r['device_kind']} chip" if r["chips"] == 1
             else f"{r['chips']} {r['device_kind']} chips ({r['mesh']})")
    print(f"serving {cfg.name} on {where} of {target.name}: batch {r['batch']} x "
          f"{r['max_len']} tokens, pages of {r['page_size']}, per chip: weights "
          f"{gib(r['weight_bytes'])}, KV cache {gib(r['cache_bytes'])}")
    for name in ("prefill", "decode"):
      a = r.get(name, {})
      if "peak_bytes" in a:
        print(f"  {name:<8} compiled in {a['compile_seconds']:.1f} s: {gib(a['peak_bytes'])} of "
              f"{gib(r['hbm_bytes'])}, {a['kernels']} Mosaic kernel call(s), "
              f"{a['flops'] / 1e9:.1f} GFLOP")
  if not r["fits"]:
    refused = [r[n]["compiler_error"] for n in ("prefill", "decode")
               if "compiler_error" in r.get(n, {})]
    need = (f"the TPU compiler ran out of HBM ({refused[0]})" if refused else
            f"{gib(max(r['prefill']['peak_bytes'], r['decode']['peak_bytes']))} of "
            f"{gib(r['hbm_bytes'])} per chip")
    print(f"error: serving {cfg.name} does not fit {target.generation} chips ({need}); lower "
          "--max_slots or --max_seq_len, or split it over more chips (--serve_mesh=tensor=N)",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
