"""What `python -m jaxllm.sft`, `jaxllm.dpo` and `jaxllm.reward` share: the experiment, the
checks before any compilation, the base and its trained part, exact match (a reward model:
pair accuracy) before and after, and the result written whole (`adapter/` in PEFT's format, or
`model/` for full fine-tuning; a reward model's head beside it)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

from absl import app, flags

from jaxllm.cli import common

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
REWARD_HEAD_FILE = "score.safetensors"  # a reward model's head, beside its adapter or model


def define_flags(experiment_file: str, data_help: str) -> dict:
  """The flags of a fine-tuning command (`--config` defaulting to experiments/`experiment_file`,
  --base, --data, --workdir, --progress, --keep_freed_memory, --mesh), by name."""
  holders = {
      "config": common.define_config_flag(os.path.join(
          os.path.dirname(common.default_experiment()), experiment_file)),
      "base": flags.DEFINE_string("base", None, "The model to tune: workdir, jaxllm/HF "
                                  "directory or .gguf."),
      "data": flags.DEFINE_string("data", None, data_help),
      "workdir": flags.DEFINE_string("workdir", None, "Run directory (default "
                                     "runs/<config name>)."),
      "progress": flags.DEFINE_bool("progress", True, "Show a progress bar."),
      "keep_freed_memory": common.define_keep_freed_memory_flag(),
      "mesh": common.define_mesh_flag()}
  flags.mark_flags_as_required(["base", "data"])
  return holders


def main(command: str, holders: dict, argv) -> None:
  """The absl main of `command` ("sft", "dpo" or "reward") with its `define_flags` holders."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.keep_freed_memory(holders["keep_freed_memory"])
  run(command, holders["config"], holders["base"].value, holders["data"].value,
      holders["workdir"].value, holders["progress"].value, holders["mesh"].value)


def experiment(holder):
  """The validated `config.FinetuneExperiment` of a `define_config_flag` flag; under
  `--show_config` it is printed, key by key with their meanings, and the command exits."""
  from jaxllm import config as config_lib
  result = config_lib.finetune_from_config_dict(common.config_value(holder))
  if flags.FLAGS.show_config:
    from jaxllm.cli import show_config
    sys.stdout.write(show_config.describe(result))
    sys.exit(0)
  return result


def write_result(workdir: str, method: str, model, base: str, head=None) -> str:
  """The fine-tuned adapter or model, written whole under a temporary name and renamed; a
  reward model's `head` (its params) adds `REWARD_HEAD_FILE` beside it."""
  import jax
  import numpy as np

  from jaxllm.checkpoint import convert
  from jaxllm.lora import peft_format
  out = os.path.join(workdir, MODEL_DIR if method == "full" else ADAPTER_DIR)
  tmp = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  if method == "full":
    common.write_model_dir(tmp, convert.Checkpoint(
        model.config, jax.tree.map(np.asarray, model.params), model.tokenizer, "jaxllm"),
        name="finetuned")
  else:
    peft_format.save(tmp, model.params, model.config, base_model=os.path.abspath(base))
  if head is not None:
    from jaxllm.train import reward
    reward.save_head(os.path.join(tmp, REWARD_HEAD_FILE), head)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out


def _exact_match(model, records, when: str):
  from jaxllm.eval import exact_match
  if not records:
    return None
  result = exact_match.score(model, records)
  print(f"held-out exact match {when}: {result['exact_match']:.3f} "
        f"({result['correct']}/{result['n']})", file=sys.stderr)
  return result["exact_match"]


def run(command: str, holder, base_path: str, data_path: str, workdir: str | None,
        progress: bool, mesh: str | None = None) -> None:
  """Fine-tunes by `command` ("sft", "dpo" or "reward") on one device or split over `mesh` (a
  spec, `placement.parse_mesh`) and prints the summary line."""
  exp = experiment(holder)  # validated before any JAX work
  workdir = workdir or f"runs/{exp.name}"
  from jaxllm.data import preference as preference_data
  from jaxllm.data import sft as sft_data
  from jaxllm.train import finetune
  wanted = finetune.settings(command, base_path, data_path, exp)
  finetune.check_workdir(workdir, wanted)
  check = sft_data.check_record if command == "sft" else preference_data.check_pair
  records = sft_data.read_jsonl(data_path, check)
  train_records, eval_records = sft_data.split_examples(records, exp.finetune.eval_fraction,
                                                        exp.train.seed)
  finetune.lora_config(exp.lora)  # bad targets fail before the model loads

  import jaxllm
  from jaxllm.parallel import placement, rules
  mesh = placement.parse_mesh(mesh)
  if mesh is not None:
    rows = 1
    for axis in rules.batch_axes(mesh):
      rows *= mesh.shape[axis]
    if exp.train.batch_size % rows:
      raise common.CommandError(f"train.batch_size={exp.train.batch_size} is not divisible by "
                                f"the {rows} batch shards of --mesh")
  # On a mesh the KV heads stay the model's own (copies would train apart from each other).
  base = jaxllm.load(base_path, mesh=mesh, kv_head_copies=False)
  if exp.train.seq_len > base.config.max_seq_len:
    raise common.CommandError(f"train.seq_len={exp.train.seq_len} exceeds the model's "
                              f"max_seq_len={base.config.max_seq_len}")
  # Every record tokenizes (or fails, naming its line) before anything compiles.
  if command == "sft":
    tokenized = [finetune.sft_examples(r, base.tokenizer, exp.finetune.loss_on)
                 for r in (train_records, eval_records)]
  else:
    tokenized = [finetune.preference_pairs(r, base.tokenizer)
                 for r in (train_records, eval_records)]
  params = finetune.prepare_params(base.params, exp, exp.train.seed)
  from jaxllm.model import transformer
  run_config = finetune.model_config(base.config, exp)
  model = dataclasses.replace(base, params=params, config=run_config,
                              graphdef=transformer.abstract_params(run_config)[0])
  finetune.write_settings(workdir, wanted)
  say = lambda msg: print(msg, file=sys.stderr)
  if command == "reward":
    _run_reward(exp, model, base.config, tokenized, workdir, base_path, progress, mesh, say)
    return
  # Exact match on held-out prompts: a preference pair's reference is its chosen reply.
  held_out = [(n, r if command == "sft" else _as_example(r))
              for n, r in eval_records[:exp.finetune.eval_generate]]
  before = _exact_match(model, held_out, "before")
  if command == "sft":
    data = finetune.sft_data(*tokenized, exp, say)
    from jaxllm.train import step as step_lib
    objective = step_lib.lm_objective(exp.train)
  else:
    data = finetune.preference_data(model.graphdef, params, *tokenized, exp, say)
    from jaxllm.train import preference
    objective = preference.objective(exp.dpo)
  result = finetune.fit(model.graphdef, params, objective, data, workdir, exp,
                        progress=progress, mesh=mesh)
  model = dataclasses.replace(model, params=result.pop("params"))
  if result["preempted_by"] is not None:
    common.finish_training(result, workdir)
  after = _exact_match(model, held_out, "after")
  # Written with the base's own config: finetune.remat / compute_dtype were this run's.
  out = write_result(workdir, exp.finetune.method,
                     dataclasses.replace(model, config=base.config), base_path)
  print(f"wrote {out}", file=sys.stderr)
  common.finish_training({**result, "command": command, "method": exp.finetune.method,
                          "out": out, "exact_match_before": before,
                          "exact_match_after": after}, workdir)


def _run_reward(exp, model, base_config, tokenized, workdir: str, base_path: str,
                progress: bool, mesh, say) -> None:
  """A reward model (`jaxllm.train.reward`): the base (with adapters, or every weight) and a
  scalar head trained by the Bradley-Terry loss; held-out pair accuracy before and after."""
  from jaxllm.train import finetune, reward
  params = reward.init_params(model.params, model.config.d_model, exp.train.seed)
  data = finetune.reward_data(*tokenized, exp, say)
  before = _pair_accuracy(model.graphdef, params, data, "before")
  result = finetune.fit(model.graphdef, params, reward.objective(), data, workdir, exp,
                        progress=progress, mesh=mesh)
  params = result.pop("params")
  if result["preempted_by"] is not None:
    common.finish_training(result, workdir)
  after = _pair_accuracy(model.graphdef, params, data, "after")
  out = write_result(workdir, exp.finetune.method, dataclasses.replace(
      model, params=params["model"], config=base_config), base_path, head=params)
  print(f"wrote {out}", file=sys.stderr)
  common.finish_training({**result, "command": "reward", "method": exp.finetune.method,
                          "out": out, "accuracy_before": before, "accuracy_after": after},
                         workdir)


def _pair_accuracy(graphdef, params, data, when: str):
  from jaxllm.train import reward
  if not data.eval_batches:
    return None
  acc, n = reward.accuracy(graphdef, params, data.eval_batches)
  print(f"held-out pair accuracy {when}: {acc:.3f} ({round(acc * n)}/{n})", file=sys.stderr)
  return acc


def _as_example(pair: dict) -> dict:
  """A preference pair as the SFT example of its chosen reply."""
  if "messages" in pair:
    return {"messages": pair["messages"] + [{"role": "assistant", "content": pair["chosen"]}]}
  return {"prompt": pair["prompt"], "completion": pair["chosen"]}
