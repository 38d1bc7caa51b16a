"""Fine-tuning a loaded model, on one device or a data x fsdp x tensor mesh: supervised (SFT)
or by preference (DPO, IPO, SimPO), training every weight, LoRA adapters, or QLoRA adapters on
an int4/int8 base.

`prepare_params` turns the base params into what trains (adapters added; for QLoRA the base
rounded first); `sft_data` and `preference_data` turn JSONL records into the items the steps
read and their held-out batches; `fit` runs `jaxllm.train.step`'s train step (pretraining's:
`trainable.split` decides what it differentiates, the objective what it minimises) with
held-out metrics, metrics.jsonl, checkpoints and resume. A checkpoint holds the trained part
alone (all params, or the adapters) with its optimizer state: a LoRA run's base is rebuilt from
the base checkpoint on resume, never copied.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxllm import config as config_lib
from jaxllm.checkpoint.orbax import Checkpointer
from jaxllm.data import preference as preference_data_lib
from jaxllm.data import sft as sft_data_lib
from jaxllm.lora import adapters
from jaxllm.quant import params as qparams
from jaxllm.train import metrics as metrics_lib
from jaxllm.train import optim, preference, step as step_lib, trainable
from jaxllm.train.loop import PreemptionGuard, TrainingDiverged

SETTINGS_FILE = "finetune.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# What a resumed run must keep (None: every key of the section): the trained structure and the
# items' contents and order. Steps, rates, intervals, LoRA dropout and the exact-match sample
# may change.
RESUME_KEYS = {"finetune": ("method", "loss_on", "eval_fraction"),
               "lora": ("targets", "rank", "alpha", "rslora", "base_bits", "base_group_size"),
               "dpo": None,
               "train": ("seq_len", "batch_size", "seed"),
               # what a rollout samples and how it is scored
               "rl": ("algorithm", "prompts_per_step", "group_size", "max_new_tokens",
                      "temperature", "top_p", "rewards", "reward_weights", "reward_model")}


@dataclasses.dataclass
class Data:
  """What `fit` reads: train `items` (packed rows, or pairs), `make` (items -> a batch) and
  the held-out `eval_batches`."""
  items: list
  make: Callable[[list], dict]
  eval_batches: list[dict]


def lora_config(cfg: config_lib.AdapterConfig) -> adapters.LoraConfig:
  """The lora section's adapters; ConfigError for unknown targets."""
  try:
    return adapters.LoraConfig(targets=tuple(cfg.targets), rank=cfg.rank, alpha=cfg.alpha,
                               rslora=cfg.rslora)
  except ValueError as e:
    raise config_lib.ConfigError(f"{e}") from None


def model_config(base: config_lib.ModelConfig,
                 experiment: config_lib.FinetuneExperiment) -> config_lib.ModelConfig:
  """The base's config with the run's `finetune.remat` and `finetune.compute_dtype` (where
  set): what the train step is traced with."""
  f = experiment.finetune
  return dataclasses.replace(base, remat=f.remat or base.remat,
                             dtype=f.compute_dtype or base.dtype)


def prepare_params(params: dict, experiment: config_lib.FinetuneExperiment,
                   seed: int = 0) -> dict:
  """The params that train: `params` as they are (full), with LoRA adapters (lora), or with
  adapters on the base rounded to int`lora.base_bits` (qlora: the blocks' projections;
  embedding, norms and head stay float). ConfigError (one line) when a rank exceeds a weight."""
  method, lora = experiment.finetune.method, experiment.lora
  if method == "full":
    return params
  if method == "qlora":
    params, _ = qparams.quantize_params(params, qparams.QuantSpec(
        bits=lora.base_bits, group_size=lora.base_group_size))
  try:
    return adapters.add(params, lora_config(lora), seed)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def settings(command: str, base: str, data: str,
             experiment: config_lib.FinetuneExperiment) -> dict:
  """What a workdir's run is (written as finetune.json; a resumed run must match it)."""
  return {"command": command, "base": os.path.abspath(base), "data": os.path.abspath(data),
          **{k: v for k, v in experiment.to_dict().items() if k != "name"}}


def check_workdir(workdir: str, wanted: dict) -> None:
  """ConfigError when `workdir` holds a different fine-tuning run (nothing there is touched)."""
  path = os.path.join(workdir, SETTINGS_FILE)
  if not os.path.exists(path):
    if os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
      raise config_lib.ConfigError(f"{workdir} holds checkpoints but no {SETTINGS_FILE}: not a "
                                   "fine-tuning workdir (choose another --workdir)")
    return
  with open(path) as f:
    have = json.load(f)
  wanted = json.loads(json.dumps(wanted))  # tuples as lists, as the file has them
  differ = [k for k in ("command", "base", "data") if have.get(k) != wanted[k]]
  # A section the saved run predates (rl, in a fine-tuning workdir of before it) is not compared.
  differ += [f"{section}.{k}" for section, keys in RESUME_KEYS.items() if section in have
             for k in (keys or wanted[section])
             if have.get(section, {}).get(k) != wanted[section][k]]
  if differ:
    raise config_lib.ConfigError(f"{workdir} holds a fine-tuning run with other settings "
                                 f"({', '.join(differ[:4])}): resume it with the same ones or "
                                 "choose another --workdir")


def write_settings(workdir: str, wanted: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, f"{SETTINGS_FILE}.partial")
  with open(tmp, "w") as f:
    json.dump(wanted, f, indent=2)
  os.replace(tmp, os.path.join(workdir, SETTINGS_FILE))


def sft_examples(records, tokenizer, loss_on: str) -> list[sft_data_lib.Example]:
  """Every record tokenized (SftDataError naming the first bad line)."""
  return [sft_data_lib.tokenize(r, tokenizer, loss_on, line=n) for n, r in records]


def sft_data(train_ex: list[sft_data_lib.Example], eval_ex: list[sft_data_lib.Example],
             experiment, say) -> Data:
  """Packed rows of the (`sft_examples`) train examples; held-out batches of the eval ones."""
  seq_len = experiment.train.seq_len
  rows, cut = sft_data_lib.pack(train_ex, seq_len)
  eval_rows = sft_data_lib.pack(eval_ex, seq_len)[0] if eval_ex else []
  learned = sum(float(e.mask[1:].sum()) for e in train_ex)
  say(f"data: {len(train_ex)} train / {len(eval_ex)} held-out examples; {len(rows)} rows of "
      f"{seq_len} tokens ({learned / max(len(rows) * seq_len, 1):.0%} learned targets)"
      f"{f'; {cut} examples longer than a row were cut' if cut else ''}")
  return Data(rows, sft_data_lib.to_batch,
              sft_data_lib.eval_batches(eval_rows, experiment.train.batch_size))


def preference_pairs(records, tokenizer):
  return [preference_data_lib.tokenize_pair(r, tokenizer, line=n) for n, r in records]


def _pair_batch(items: list[dict]) -> dict:
  batch = preference_data_lib.to_batch([it["rows"] for it in items])
  batch["reference"] = np.stack([it["reference"] for it in items]).astype(np.float32)
  return batch


def preference_data(graphdef, params, train_pairs, eval_pairs, experiment, say) -> Data:
  """Rows of the (`preference_pairs`) train and held-out pairs with their reference
  log-probabilities under `params` (the starting point: for LoRA the base itself), computed
  here once (zeros for SimPO, which has none)."""
  seq_len, batch_size = experiment.train.seq_len, experiment.train.batch_size
  parts = []
  for pairs in (train_pairs, eval_pairs):
    rows, cut = preference_data_lib.rows(pairs, seq_len)
    if experiment.dpo.loss == "simpo" or not rows:
      refs = np.zeros((len(rows), 2), np.float32)
    else:
      batches = sft_data_lib.eval_batches([{"rows": r, "reference": np.zeros(2)} for r in rows],
                                          batch_size, _pair_batch)
      refs = preference.reference_logps(graphdef, params, batches)[:len(rows)]
    parts.append(([{"rows": r, "reference": q} for r, q in zip(rows, refs)], cut))
  (items, cut), (eval_items, _) = parts
  say(f"data: {len(items)} train / {len(eval_items)} held-out pairs"
      f"{f'; {cut} replies longer than a row were cut' if cut else ''}"
      f"{'' if experiment.dpo.loss == 'simpo' else '; reference log-probabilities computed'}")
  return Data(items, _pair_batch, sft_data_lib.eval_batches(eval_items, batch_size, _pair_batch))


def reward_data(train_pairs, eval_pairs, experiment, say) -> Data:
  """Whole-sequence rows of the (`preference_pairs`) train and held-out pairs for a reward
  model (`data.preference.to_reward_batch`)."""
  seq_len, batch_size = experiment.train.seq_len, experiment.train.batch_size
  (rows, cut), (eval_rows, _) = (preference_data_lib.rows(p, seq_len - 1)
                                 for p in (train_pairs, eval_pairs))
  say(f"data: {len(rows)} train / {len(eval_rows)} held-out pairs"
      f"{f'; {cut} replies longer than a row were cut' if cut else ''}")
  return Data(rows, preference_data_lib.to_reward_batch,
              sft_data_lib.eval_batches(eval_rows, batch_size,
                                        preference_data_lib.to_reward_batch))


def checkpoint_state(state: dict) -> dict:
  """The train state as checkpointed: the trained part in place of the params."""
  return {**state, "params": trainable.trainable_params(state["params"])}


def restore_state(checkpointer: Checkpointer, state: dict, step: int) -> dict:
  """`state` with checkpoint `step`'s trained part and optimizer state; the frozen rest (a
  LoRA run's base) stays the one `state` holds, rebuilt from the base checkpoint."""
  restored = checkpointer.restore(checkpoint_state(state), step=step)
  return {**restored, "params": trainable.combine(restored["params"],
                                                  trainable.split(state["params"])[1])}


def state_shardings(state: dict, graphdef, optimizer, mesh) -> dict:
  """Where a fine-tuning state lives on `mesh`: params by the logical-axis rules (a LoRA
  weight's a and b split like their weight, `placement.lora_axes`; a QTensor base as stored),
  the optimizer moments like the part they train, step and key replicated."""
  from flax import nnx

  from jaxllm.model import transformer
  from jaxllm.parallel import placement, zero
  scored = trainable.REWARD_HEAD in state["params"]  # a reward model: {"model", "score"}
  model_params = state["params"]["model"] if scored else state["params"]
  axes = transformer.logical_axes(nnx.merge(graphdef, model_params).cfg)
  if scored:
    axes = {"model": axes, trainable.REWARD_HEAD: ("embed",)}
  params = placement.qtensor_shardings(state["params"], axes, mesh)
  opt = zero.state_shardings(optimizer, jax.eval_shape(lambda: state["opt_state"]),
                             trainable.trainable_like(state["params"], params), mesh, 0)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {**jax.tree.map(lambda _: replicated, {k: v for k, v in state.items()
                                                if k not in ("params", "opt_state")}),
          "params": params, "opt_state": opt}


def fit(graphdef, params: dict, objective: step_lib.Objective, data: Data, workdir: str,
        experiment: config_lib.FinetuneExperiment, *, progress: bool = True,
        on_step: Callable[[int], None] | None = None, say=None, mesh=None) -> dict[str, Any]:
  """Fine-tunes `params` (from `prepare_params`) on `data` in `workdir`, resuming its newest
  checkpoint; returns the summary of the last step and held-out evaluation (`eval_<metric>`),
  with "params" the fine-tuned params. The steps donate their state, so `params`' arrays (the
  frozen base included: it passes through each step in place, never copied) are consumed: use
  the returned ones. `mesh` (a `jax.sharding.Mesh` with any of the data, fsdp and tensor
  axes) splits the state (`state_shardings`) and every batch's rows over it."""
  say = say or (lambda msg: tqdm.write(msg, file=sys.stderr))
  train, method = experiment.train, experiment.finetune.method
  optimizer = optim.make_optimizer(train)
  dropout = experiment.lora.dropout if method != "full" else 0.0
  step_fn = step_lib.make_train_step(graphdef, optimizer, train, objective=objective,
                                     lora_dropout=dropout)
  eval_fn = step_lib.make_objective_eval_step(graphdef, objective)
  state = step_lib.init_state(params, optimizer, train.seed)
  if mesh is None:
    train_step = jax.jit(step_fn, donate_argnums=0)
    eval_step = jax.jit(eval_fn)
    put_batch = lambda b: jax.tree.map(jnp.asarray, b)
  else:
    from jaxllm.parallel import mesh as mesh_lib
    from jaxllm.parallel import rules
    shardings = state_shardings(state, graphdef, optimizer, mesh)
    state = jax.device_put(state, shardings)
    batch_sh = rules.batch_sharding(mesh)
    train_step = mesh_lib.under_mesh(jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                                             out_shardings=(shardings, None),
                                             donate_argnums=0), mesh)
    eval_step = mesh_lib.under_mesh(jax.jit(eval_fn, in_shardings=(shardings["params"],
                                                                   batch_sh)), mesh)
    put_batch = lambda b: jax.device_put(b, batch_sh)
  checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), train.keep_checkpoints)
  n_train = sum(x.size for x in jax.tree.leaves(trainable.trainable_params(params)))
  n_all = sum(getattr(x, "size", 0) for x in jax.tree.leaves(params))
  say(f"method {method}: {n_train / 1e6:.3f}M trained parameters of {n_all / 1e6:.2f}M")
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    say(f"resuming from checkpoint step {resume_step}")
    state = restore_state(checkpointer, state, resume_step)
  writer = metrics_lib.MetricsWriter(os.path.join(workdir, METRICS_FILE), None,
                                     resume_step=resume_step)
  eval_data = [put_batch(b) for b in data.eval_batches]

  def evaluate(p):
    total, sums = 0.0, {}
    for b in eval_data:
      w, s = jax.device_get(eval_step(p, b))
      total += float(w)
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
    return {f"eval_{k}": v / max(total, 1.0) for k, v in sums.items()}

  start = int(state["step"])
  last: dict[str, Any] = {"step": start}
  saved, stopped_by = resume_step, None
  batches = sft_data_lib.batches(data.items, train.batch_size, train.seed, start, data.make)
  bar = tqdm(total=train.steps, initial=start, disable=not progress,
             desc=f"{experiment.name} ({method})", unit="step", dynamic_ncols=True)
  began = time.perf_counter()
  try:
    with PreemptionGuard() as guard:
      for step in range(start + 1, train.steps + 1):
        state, metrics = train_step(state, put_batch(next(batches)))
        final = step == train.steps
        due_ckpt = step % train.checkpoint_every == 0 or final or guard.signum is not None
        if step % train.log_every == 0 or final or due_ckpt or step == start + 1:
          values = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
          if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise TrainingDiverged(f"non-finite loss {values['loss']} / grad norm "
                                   f"{values['grad_norm']} at step {step}; last good "
                                   f"checkpoint: step {saved} (kept)")
          last = {"step": step, **values, "elapsed_s": time.perf_counter() - began}
          writer.write(last)
          bar.set_postfix(loss=f"{values['loss']:.3f}")
        if eval_data and (step % train.eval_every == 0 or final):
          ev = evaluate(state["params"])
          writer.write({"step": step, **ev})
          last.update(ev)
          say(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in list(ev.items())[:3]))
        if due_ckpt:
          saved = checkpointer.save(checkpoint_state(state))
        bar.update(1)
        if on_step is not None:
          on_step(step)
        if guard.signum is not None:
          stopped_by = guard.signum
          break
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  last.update(checkpoint_step=saved, preempted_by=stopped_by, params=state["params"],
              trained_parameters=n_train)
  return last
