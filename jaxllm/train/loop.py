"""The training loop: data, sharded state, jitted steps, eval, metrics, checkpoints, preemption."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxllm import config as config_lib
from jaxllm.checkpoint.orbax import Checkpointer
from jaxllm.data import corpus as corpus_lib
from jaxllm.data import pipeline
from jaxllm.errors import UserError
from jaxllm.model import transformer
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules, zero
from jaxllm.train import distill
from jaxllm.train import metrics as metrics_lib
from jaxllm.train import optim, profiling, step as step_lib
from jaxllm.train import workdir as workdir_lib


class TrainingDiverged(UserError, RuntimeError):
  """Loss or gradients became non-finite; the last good checkpoint is kept."""


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then saves and stops)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def state_shardings(cfg: config_lib.Config, mesh):
  """(graphdef, abstract state, its shardings, optimizer) without allocating anything."""
  graphdef, abstract_params = transformer.abstract_params(
      cfg.model, sequence_parallel=cfg.mesh.sequence_parallel,
      context_parallel=cfg.train.context_parallel)
  optimizer = optim.make_optimizer(cfg.train)
  param_sh = rules.tree_shardings(transformer.logical_axes(cfg.model), abstract_params, mesh)
  abstract_state = jax.eval_shape(lambda p: fresh_state(cfg, p, optimizer), abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Optimizer moments take their parameter's sharding (FSDP and tensor parallelism split them
  # alike), and from ZeRO stage 1 a split over the data axis too.
  opt_sh = zero.state_shardings(optimizer, abstract_state["opt_state"], param_sh, mesh,
                                cfg.mesh.zero_stage, cfg.train.offload_optimizer)
  shardings = jax.tree.map(lambda _: replicated, abstract_state)
  shardings["params"], shardings["opt_state"] = param_sh, opt_sh
  return graphdef, abstract_state, shardings, optimizer


def fresh_state(cfg: config_lib.Config, params, optimizer) -> step_lib.TrainState:
  """The train state of step 0 around `params` (with the loss scale when the run scales)."""
  scale = cfg.train.loss_scale_init if config_lib.loss_scaling_on(cfg) else None
  return step_lib.init_state(params, optimizer, cfg.train.seed, scale)


def gradient_shardings(cfg: config_lib.Config, shardings, mesh):
  """Where the train step pins gradients: the moments' layout under ZeRO stage 2, else None."""
  if cfg.mesh.zero_stage < 2:
    return None
  _, abstract_params = transformer.abstract_params(cfg.model)
  return zero.gradient_shardings(abstract_params, shardings["params"], mesh, cfg.mesh.zero_stage)


def jit_train_step(cfg: config_lib.Config, graphdef, optimizer, shardings, batch_sharding,
                   teacher=None):
  """The train step as training compiles it: shardings pinned, the old state donated (so the
  new one is written in its place). With `teacher` = (distill.Teacher, its params' shardings)
  the teacher's params are a third, undonated argument, bound here: the result still takes
  (state, batch)."""
  mesh = jax.tree.leaves(shardings)[0].mesh
  grad_sh = gradient_shardings(cfg, shardings, mesh)
  offload = ((zero.on_device(shardings["opt_state"]), shardings["opt_state"])
             if cfg.train.offload_optimizer else None)
  if teacher is None:
    return jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train,
                                            grad_shardings=grad_sh, offload=offload),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)
  t, t_shardings = teacher
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train,
                                          (t.graphdef, cfg.distill), grad_sh, offload),
                 in_shardings=(shardings, batch_sharding, t_shardings),
                 out_shardings=(shardings, None), donate_argnums=0)
  return lambda state, batch: step(state, batch, t.params)


def initial_state(cfg: config_lib.Config, optimizer, shardings, params=None):
  """The freshly initialised train state, created directly in its shardings (from `params`,
  host arrays, when given: a student initialised from its teacher)."""
  if params is not None:
    return jax.jit(lambda p: fresh_state(cfg, p, optimizer), out_shardings=shardings)(params)

  def init():
    _, params = transformer.split(transformer.create(cfg.model, cfg.train.seed))
    return fresh_state(cfg, params, optimizer)
  return jax.jit(init, out_shardings=shardings)()


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(eval_step, params, batches, sharding) -> dict[str, float]:
  nll, weight = 0.0, 0.0
  for batch in batches:
    n, w = eval_step(params, _to_global(batch, sharding))
    nll, weight = nll + float(n), weight + float(w)
  loss = nll / max(weight, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0)), "eval_tokens": weight}


def _corpus(data: config_lib.DataConfig):
  """(what the train iterator reads: documents or mixture sources, the corpus)."""
  if not data.sources:
    corpus = corpus_lib.build_corpus(data.paths, data.eval_fraction, data.eval_paths,
                                     data.undecodable)
    return corpus.train, corpus
  return corpus_lib.build_mixture(config_lib.parse_sources(data.sources),
                                  config_lib.mixture_weights(data), data.eval_fraction,
                                  data.eval_paths, data.undecodable)


def _tokenizer(cfg: config_lib.Config, workdir: str, corpus, teacher, say):
  """The run's tokenizer: the teacher's when distilling (saved into the workdir), else the
  workdir's sentencepiece model (copied from data.tokenizer or trained first)."""
  is_main = jax.process_index() == 0
  if teacher is not None:
    if is_main:
      workdir_lib.save_tokenizer(workdir, teacher.tokenizer)
    return teacher.tokenizer
  if not os.path.exists(os.path.join(workdir, workdir_lib.TOKENIZER_FILE)):
    say(f"tokenizer: building {cfg.model.vocab_size} pieces -> {workdir}/"
        f"{workdir_lib.TOKENIZER_FILE}")
  if jax.process_count() > 1:
    # One process builds the tokenizer into the shared workdir; the others then read that file,
    # so every process surely tokenizes alike.
    if is_main:
      workdir_lib.prepare_tokenizer(workdir, cfg, corpus)
    multihost_utils.sync_global_devices("jaxllm:tokenizer")
  return workdir_lib.prepare_tokenizer(workdir, cfg, corpus)


def log_compiles(compile_log: profiling.CompileLog, writer, step: int, length: int,
                  compiled_lengths: set[int]) -> None:
  """One metrics row per compilation since the last call (`compile` the function, `compile_s`
  its seconds, `compiles` its count so far); a train step compiled again for a row length it
  has compiled before is a recompilation, and a warning."""
  for name, (_, seconds) in compile_log.take().items():
    row = {"step": step, "compile": name, "compile_s": seconds,
           "compiles": compile_log.counts[name]}
    if name == "train_step":
      if length in compiled_lengths:
        row["recompiled"] = True
        logging.warning(
            "train_step compiled again at step %d (%.1f s; %d compilations so far): the "
            "shapes, dtypes or shardings of its inputs changed since its first step", step,
            seconds, compile_log.counts[name])
      compiled_lengths.add(length)
    writer.write(row)


def train(cfg: config_lib.Config, workdir: str, *, progress: bool = True,
          on_step: Callable[[int], None] | None = None,
          teacher: distill.Teacher | None = None) -> dict[str, Any]:
  """Trains (or resumes) `cfg` in `workdir`; returns a summary of the last step and eval.

  `progress` shows the progress bar; the run's lines (corpus, tokenizer, model, evaluations,
  warnings) go to stderr from process 0 either way. `on_step(step)` is called after each
  completed step (tests use it to simulate preemption).
  With `teacher` the student distills from it (`cfg.distill`): the teacher's tokenizer becomes
  the workdir's, and the student may start from the teacher's layers.
  """
  process_index = jax.process_index()
  is_main = process_index == 0
  # `progress` is the bar alone: what the run found and decided is always said (process 0).
  say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if is_main else (lambda _: None)
  mesh_shape = config_lib.validate_for_devices(cfg, jax.device_count(), jax.default_backend())
  if teacher is not None:
    distill.check(cfg, teacher)
  workdir_lib.check_resumable(workdir, cfg)
  train_docs, corpus = _corpus(cfg.data)  # before the workdir exists: a bad corpus leaves none
  os.makedirs(workdir, exist_ok=True)
  if corpus.undecodable:
    action = ("left out" if cfg.data.undecodable == "skip"
              else "kept with U+FFFD for their bad bytes")
    say(f"warning: {len(corpus.undecodable)} files or JSONL records are not UTF-8 and were "
        f"{action} (first: {corpus.undecodable[0]}; data.undecodable=skip|replace)")
  if cfg.data.sources:
    say("corpus: " + ", ".join(f"{s.name} {len(s.train)} docs x {s.weight:.3f}"
                               for s in train_docs) + f"; {len(corpus.eval)} held-out documents")
  else:
    say(f"corpus: {len(corpus.train)} train / {len(corpus.eval)} held-out documents"
        f"{'' if cfg.data.paths else ' (Python standard library)'}")
  tokenizer = _tokenizer(cfg, workdir, corpus, teacher, say)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abstract_state, shardings, optimizer = state_shardings(cfg, mesh)
  batch_sh = rules.batch_sharding(mesh)
  rows = rules.process_rows(batch_sh, cfg.train.batch_size)
  train_iter = pipeline.train_iterator(
      train_docs, tokenizer, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
      seed=cfg.data.seed, rows=rows, packing=cfg.data.packing,
      packing_bins=cfg.data.packing_bins, order=cfg.data.order)
  schedule = config_lib.parse_seq_len_schedule(cfg.train.seq_len_schedule)
  eval_data = pipeline.eval_batches(
      corpus.eval, tokenizer, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
      num_batches=cfg.train.eval_batches, rows=rows)
  checkpointer = Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
                              cfg.train.keep_checkpoints)
  resume_step = checkpointer.latest_step()
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
  say(f"model: {n_params / 1e6:.2f}M params; mesh {mesh_shape} over {jax.device_count()} "
      f"{jax.default_backend()} device(s); workdir {workdir}")
  if resume_step is not None:
    say(f"resuming from checkpoint step {resume_step}")
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, shardings)
    state = checkpointer.restore(abstract, train_iter, step=resume_step)
  else:
    init_layers = config_lib.parse_layers(cfg.distill.init_layers)
    start_params = None
    if teacher is not None and init_layers:
      say(f"student: teacher layers {list(init_layers)} + its embeddings and head")
      start_params = distill.student_from_teacher(cfg.model, init_layers, teacher)
    state = initial_state(cfg, optimizer, shardings, start_params)
  if is_main:
    workdir_lib.write_config(workdir, cfg)

  teacher_step = None
  if teacher is not None:
    t_shardings = rules.tree_shardings(transformer.logical_axes(teacher.config), teacher.params,
                                       mesh)
    teacher = teacher._replace(params=jax.device_put(teacher.params, t_shardings))
    teacher_step = (teacher, t_shardings)
  train_step = mesh_lib.under_mesh(
      jit_train_step(cfg, graphdef, optimizer, shardings, batch_sh, teacher_step), mesh)
  eval_step = mesh_lib.under_mesh(jax.jit(
      step_lib.make_eval_step(graphdef), in_shardings=(shardings["params"], batch_sh)), mesh)
  writer = metrics_lib.MetricsWriter(
      os.path.join(workdir, workdir_lib.METRICS_FILE) if is_main else None,
      os.path.join(workdir, workdir_lib.TB_DIR) if is_main else None, resume_step=resume_step)

  start = int(jax.device_get(state["step"]))
  last: dict[str, Any] = {"step": start}
  bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main),
             desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
  interval_start, interval_tokens, saved_step = time.perf_counter(), 0.0, resume_step
  interval_padding = interval_rows = 0
  stopped_by: int | None = None
  compile_log = profiling.CompileLog(("train_step", "eval_step"))
  trace = profiling.TraceWindow(config_lib.parse_profile_steps(cfg.train.profile_steps),
                                os.path.join(workdir, workdir_lib.TB_DIR))
  compiled_lengths: set[int] = set()
  if start < cfg.train.steps:
    say(f"step {start + 1}: compiling the train step (the first step waits for it)")
  try:
    with PreemptionGuard() as guard, compile_log:
      first_started = time.perf_counter()
      for step in range(start + 1, cfg.train.steps + 1):
        host_batch = next(train_iter)
        interval_padding += int(np.sum(host_batch["segment_ids"] == 0))
        interval_rows += host_batch["segment_ids"].shape[0]
        length = config_lib.seq_len_at(schedule, cfg.train.seq_len, step)
        if length < cfg.train.seq_len:  # the sequence-length warm-up (one compile per length)
          host_batch = pipeline.split_rows(host_batch, length)
        trace.before(step)
        state, metrics = train_step(state, _to_global(host_batch, batch_sh))
        if trace.after(step, metrics):
          say(f"profile: steps {step - trace.count + 1}-{step} traced into "
              f"{workdir}/{workdir_lib.TB_DIR}")
        log_compiles(compile_log, writer, step, length, compiled_lengths)
        interval_tokens += cfg.train.batch_size * cfg.train.seq_len
        final = step == cfg.train.steps
        due_log = step % cfg.train.log_every == 0 or final or step == start + 1
        due_ckpt = step % cfg.train.checkpoint_every == 0 or final or guard.signum is not None
        if due_log or due_ckpt:
          values = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                    for k, v in jax.device_get(metrics).items()}
          # Under loss scaling a step with non-finite gradients was skipped (state intact) and
          # halved the scale; only at the floor scale of 1 is that divergence.
          skipped = values.get("skipped", 0.0) > 0 and values["loss_scale"] > 1.0
          if not skipped and not (math.isfinite(values["loss"])
                                  and math.isfinite(values["grad_norm"])):
            raise TrainingDiverged(
                f"non-finite loss {values['loss']} / grad norm {values['grad_norm']} at step "
                f"{step}{' (loss scale 1)' if 'loss_scale' in values else ''}; last good "
                f"checkpoint: step {saved_step} (kept)")
        if due_log:
          elapsed = time.perf_counter() - interval_start
          last = {"step": step, "loss": values["loss"], "lr": values["lr"],
                  "grad_norm": values["grad_norm"],
                  **{k: values[k] for k in ("kd_loss", "loss_scale", "skipped") if k in values},
                  "tokens_per_s": interval_tokens / max(elapsed, 1e-9),
                  # this process's rows: the share of their tokens that is packing padding
                  "padding": interval_padding / max(interval_rows * cfg.train.seq_len, 1),
                  "seq_len": length,
                  **{k: v for k, v in values.items() if k.startswith("moe_")}}
          writer.write(last)
          bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
          interval_start, interval_tokens = time.perf_counter(), 0.0
          interval_padding = interval_rows = 0
        if step % cfg.train.eval_every == 0 or final:
          ev = {"step": step, **evaluate(eval_step, state["params"], eval_data, batch_sh)}
          log_compiles(compile_log, writer, step, length, compiled_lengths)
          writer.write({k: v for k, v in ev.items() if k != "eval_tokens"})
          last.update(ev)
          say(f"step {step}: eval_loss {ev['eval_loss']:.4f}  eval_ppl {ev['eval_ppl']:.2f}")
          interval_start = time.perf_counter()  # eval time is not training throughput
        if due_ckpt:
          saved_step = checkpointer.save(state, train_iter)
          interval_start = time.perf_counter()
        bar.update(1)
        if step == start + 1:
          # The rate and ETA count from here: the first step's compilation is not a step.
          if not bar.disable:
            bar.initial, bar.start_t = bar.n, time.time()  # tqdm's clock is time.time
          say(f"step {step}: compiled and ran in {time.perf_counter() - first_started:.1f} s")
        if on_step is not None:
          on_step(step)
        if guard.signum is not None and saved_step == step:
          stopped_by = guard.signum
          break
        if guard.signum is not None:  # signal arrived after this step's save decision
          saved_step = checkpointer.save(state, train_iter)
          stopped_by = guard.signum
          break
  finally:
    trace.close()
    train_iter.close()
    bar.close()
    writer.close()
    checkpointer.close()
  last["checkpoint_step"] = saved_step
  last["preempted_by"] = stopped_by
  last["undecodable"] = len(corpus.undecodable)
  last["params"] = state["params"]
  return last
