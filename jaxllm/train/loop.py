"""The training loop: data, sharded state, jitted steps, eval, metrics, checkpoints (two tiers),
preemption, rollbacks of bad steps, goodput, hang and straggler reports."""

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
from jaxllm.checkpoint.orbax import Checkpointer, restore_newest
from jaxllm.data import corpus as corpus_lib
from jaxllm.data import pipeline
from jaxllm.errors import UserError
from jaxllm.model import transformer
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules, zero
from jaxllm.train import distill
from jaxllm.train import goodput as goodput_lib
from jaxllm.train import metrics as metrics_lib
from jaxllm.train import optim, profiling, recovery, step as step_lib
from jaxllm.train import stragglers as stragglers_lib
from jaxllm.train import watchdog as watchdog_lib
from jaxllm.train import workdir as workdir_lib


class TrainingDiverged(UserError, RuntimeError):
  """Loss or gradients turned non-finite (or spiked) more often than train.rollback_limit
  allows; the last good checkpoint is kept."""


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
                 compiled_lengths: set[int]) -> float:
  """One metrics row per compilation since the last call (`compile` the function, `compile_s`
  its seconds, `compiles` its count so far); a train step compiled again for a row length it
  has compiled before is a recompilation, and a warning. Returns the seconds compiled."""
  total = 0.0
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
    total += seconds
  return total


def train(cfg: config_lib.Config, workdir: str, *, progress: bool = True,
          on_step: Callable[[int], None] | None = None,
          teacher: distill.Teacher | None = None,
          on_batch: Callable[[int, dict], dict] | None = None) -> dict[str, Any]:
  """Trains (or resumes) `cfg` in `workdir`; returns a summary of the last step and eval.

  `progress` shows the progress bar; the run's lines (corpus, tokenizer, model, evaluations,
  warnings) go to stderr from process 0 either way. `on_step(step)` is called after each
  completed step (tests use it to simulate preemption); `on_batch(step, batch)` returns the
  host batch step `step` trains on (tests inject faults with it).
  With `teacher` the student distills from it (`cfg.distill`): the teacher's tokenizer becomes
  the workdir's, and the student may start from the teacher's layers.
  """
  process_index = jax.process_index()
  is_main = process_index == 0
  # `progress` is the bar alone: what the run found and decided is always said (process 0).
  say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if is_main else (lambda _: None)
  say_always = lambda msg: tqdm.write(msg, file=sys.stderr)  # a line every process must say
  mesh_shape = config_lib.validate_for_devices(cfg, jax.device_count(), jax.default_backend())
  if teacher is not None:
    distill.check(cfg, teacher)
  workdir_lib.check_resumable(workdir, cfg)
  if cfg.train.local_checkpoint_dir and jax.process_count() > 1:
    raise config_lib.ConfigError(
        "train.local_checkpoint_dir works in one process: the local copies of a multi-host "
        "run are not one checkpoint (orbax's emergency checkpointing, for multi-slice TPU "
        "runs, is not wired in)")
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
                              cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoint)
  local = None  # the local tier: saved more often, restored first when newer
  if cfg.train.local_checkpoint_dir:
    local = Checkpointer(workdir_lib.local_checkpoint_dir(workdir, cfg.train.local_checkpoint_dir),
                         keep=2, async_save=cfg.train.async_checkpoint)
  tiers = [local, checkpointer] if local is not None else [checkpointer]
  clock = goodput_lib.GoodputClock(workdir, writer=is_main)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
  say(f"model: {n_params / 1e6:.2f}M params; mesh {mesh_shape} over {jax.device_count()} "
      f"{jax.default_backend()} device(s); workdir {workdir}")
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
  initial_data = train_iter.get_state()  # where a rollback before the first checkpoint goes

  def step_0_state():
    init_layers = config_lib.parse_layers(cfg.distill.init_layers)
    start_params = None
    if teacher is not None and init_layers:
      say(f"student: teacher layers {list(init_layers)} + its embeddings and head")
      start_params = distill.student_from_teacher(cfg.model, init_layers, teacher)
    return initial_state(cfg, optimizer, shardings, start_params)

  restore_started = time.perf_counter()
  state, resume_step, tier = restore_newest(tiers, abstract, train_iter, warn=say)
  if resume_step is not None:
    clock.add("restore", time.perf_counter() - restore_started)
    say(f"resuming from checkpoint step {resume_step}"
        + (f" (local tier, {cfg.train.local_checkpoint_dir})" if tiers[tier] is local else ""))
  else:
    state = step_0_state()
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
  skips = recovery.SkippedBatches(workdir, config_lib.parse_skip_steps(cfg.train.skip_steps),
                                  writer=is_main)
  detector = recovery.SpikeDetector(cfg.train.spike_loss_factor, cfg.train.spike_grad_factor,
                                    cfg.train.spike_window)
  stragglers = stragglers_lib.StragglerMonitor(cfg.train.straggler_factor, jax.process_count())

  def judge(step: int, metrics) -> tuple[dict[str, Any], str | None]:
    """(the step's metrics on the host, why the step is bad or None)."""
    fetch_started = time.perf_counter()
    metrics = jax.device_get(metrics)
    stragglers.waited(time.perf_counter() - fetch_started)
    values = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
              for k, v in metrics.items()}
    # Under loss scaling a step with non-finite gradients was skipped (state intact) and halved
    # the scale; only at the floor scale of 1 is that divergence.
    if values.get("skipped", 0.0) > 0 and values["loss_scale"] > 1.0:
      return values, None
    reason = detector.verdict(step, values["loss"], values["grad_norm"])
    if reason is not None and "loss_scale" in values:
      reason += " (loss scale 1)" if values["loss_scale"] <= 1.0 else ""
    return values, reason

  start = int(jax.device_get(state["step"]))
  last: dict[str, Any] = {"step": start}
  bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main),
             desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
  interval_start, interval_tokens, saved_step = time.perf_counter(), 0.0, resume_step
  last_save = time.perf_counter()
  interval_padding = interval_rows = 0
  stopped_by: int | None = None
  rollbacks = 0
  end = "failed"
  compile_log = profiling.CompileLog(("train_step", "eval_step"))
  trace = profiling.TraceWindow(config_lib.parse_profile_steps(cfg.train.profile_steps),
                                os.path.join(workdir, workdir_lib.TB_DIR))
  compiled_lengths: set[int] = set()
  ran_lengths: set[int] = set()  # row lengths a step has run at in this process
  evaluated = False
  if start < cfg.train.steps:
    say(f"step {start + 1}: compiling the train step (the first step waits for it)")
  try:
    with PreemptionGuard() as guard, compile_log, watchdog_lib.Watchdog(
        cfg.train.watchdog_s, process_index,
        exit_code=watchdog_lib.EXIT_CODE if cfg.train.watchdog_exit else None,
        report=say_always) as watchdog:
      first_started = time.perf_counter()
      clock.first_step()
      pending = None  # (step, metrics): judged after the next step is dispatched
      step = start
      while step < cfg.train.steps:
        step += 1
        stragglers.step_starts()
        iteration_started = time.perf_counter()
        length = config_lib.seq_len_at(schedule, cfg.train.seq_len, step)
        # A step that may compile (the first at each sequence length) is not timed by the
        # watchdog.
        watchdog.beat(f"step {step}" if length in ran_lengths else None)
        data_started = time.perf_counter()
        for _ in range(skips.count(step)):  # batches known to be bad
          next(train_iter)
        host_batch = next(train_iter)
        data_s = time.perf_counter() - data_started
        if on_batch is not None:
          host_batch = on_batch(step, host_batch)
        interval_padding += int(np.sum(host_batch["segment_ids"] == 0))
        interval_rows += host_batch["segment_ids"].shape[0]
        if length < cfg.train.seq_len:  # the sequence-length warm-up (one compile per length)
          host_batch = pipeline.split_rows(host_batch, length)
        trace.before(step)
        global_batch = _to_global(host_batch, batch_sh)
        dispatch_started = time.perf_counter()
        state, metrics = train_step(state, global_batch)
        # Dispatch returns at once unless the runtime runs the step in this thread (XLA:CPU
        # with collectives across processes): either way it is time on the devices.
        stragglers.waited(time.perf_counter() - dispatch_started)
        if trace.after(step, metrics):
          say(f"profile: steps {step - trace.count + 1}-{step} traced into "
              f"{workdir}/{workdir_lib.TB_DIR}")
        compile_s = log_compiles(compile_log, writer, step, length, compiled_lengths)
        interval_tokens += cfg.train.batch_size * cfg.train.seq_len
        final = step == cfg.train.steps
        due_log = step % cfg.train.log_every == 0 or final or step == start + 1
        if due_log and cfg.train.checkpoint_minutes > 0:
          due_time = time.perf_counter() - last_save >= 60 * cfg.train.checkpoint_minutes
          if jax.process_count() > 1:  # every process must take the same decision
            due_time = bool(multihost_utils.broadcast_one_to_all(np.asarray(due_time)))
        else:
          due_time = False
        due_ckpt = (step % cfg.train.checkpoint_every == 0 or final or due_time
                    or guard.signum is not None)
        # The previous step is judged now that this one is queued behind it; a step whose
        # metrics are logged or whose state is saved is judged at once.
        bad = None
        if pending is not None:
          _, reason = judge(*pending)
          bad = (pending[0], reason) if reason else None
          pending = None
        if bad is None and (due_log or due_ckpt):
          values, reason = judge(step, metrics)
          bad = (step, reason) if reason else None
        elif bad is None:
          pending = (step, metrics)
        if bad is not None:
          bad_step, reason = bad
          if rollbacks >= cfg.train.rollback_limit:
            end = "diverged"
            raise TrainingDiverged(
                f"{reason} at step {bad_step}; {rollbacks} rollbacks so far "
                f"(train.rollback_limit={cfg.train.rollback_limit}); "
                + (f"last good checkpoint: step {saved_step} (kept)" if saved_step is not None
                   else "no checkpoint yet"))
          rollbacks += 1
          clock.rollbacks += 1
          skips.add(bad_step, reason)
          for c in tiers:
            c.wait()
          restore_started = time.perf_counter()
          state, back_to, _ = restore_newest(tiers, abstract, train_iter, warn=say)
          if back_to is None:
            state, back_to = step_0_state(), 0
            train_iter.set_state(initial_data)
          clock.add("restore", time.perf_counter() - restore_started)
          detector.rewind(back_to)
          writer.rewind(back_to)
          say(f"step {bad_step}: {reason}; rolled back to step {back_to}, and its batch will "
              f"be skipped (rollback {rollbacks} of at most {cfg.train.rollback_limit}; "
              f"{workdir}/{recovery.SKIPS_FILE})")
          step, pending = back_to, None
          stragglers.forget()
          bar.n = back_to
          bar.refresh()
          interval_start, interval_tokens = time.perf_counter(), 0.0
          interval_padding = interval_rows = 0
          continue
        eval_s = checkpoint_s = 0.0
        if due_log:
          elapsed = time.perf_counter() - interval_start
          last = {"step": step, "loss": values["loss"], "lr": values["lr"],
                  "grad_norm": values["grad_norm"],
                  **{k: values[k] for k in ("kd_loss", "loss_scale", "skipped") if k in values},
                  "tokens_per_s": interval_tokens / max(elapsed, 1e-9),
                  # this process's rows: the share of their tokens that is packing padding
                  "padding": interval_padding / max(interval_rows * cfg.train.seq_len, 1),
                  "seq_len": length, "goodput": clock.fraction(),
                  **{k: v for k, v in values.items() if k.startswith("moe_")}}
          hosts = stragglers.gather()
          if hosts is not None:
            last["host_s_max"] = max(hosts["host_s"])
            if hosts["straggler"] is not None:
              p = hosts["straggler"]
              say(f"straggler: process {p} spent {hosts['host_s'][p]:.2f} s on host work over "
                  f"the last {hosts['steps']} steps, the other processes "
                  f"{hosts['others_s']:.2f} s (median); they wait for it at every step's "
                  "collectives")
          writer.write(last)
          bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
          interval_start, interval_tokens = time.perf_counter(), 0.0
          interval_padding = interval_rows = 0
        if step % cfg.train.eval_every == 0 or final:
          eval_started = time.perf_counter()
          watchdog.beat(f"evaluation at step {step}" if evaluated else None)
          ev = {"step": step, **evaluate(eval_step, state["params"], eval_data, batch_sh)}
          eval_compile_s = log_compiles(compile_log, writer, step, length, compiled_lengths)
          writer.write({k: v for k, v in ev.items() if k != "eval_tokens"})
          last.update(ev)
          say(f"step {step}: eval_loss {ev['eval_loss']:.4f}  eval_ppl {ev['eval_ppl']:.2f}")
          eval_s = time.perf_counter() - eval_started - eval_compile_s
          compile_s += eval_compile_s
          evaluated = True
          interval_start = time.perf_counter()  # eval time is not training throughput
        if due_ckpt:
          save_started = time.perf_counter()
          watchdog.beat(f"checkpoint save at step {step}")
          saved_step = checkpointer.save(state, train_iter)
          last_save = interval_start = time.perf_counter()
          checkpoint_s = last_save - save_started
        elif local is not None and step % cfg.train.local_checkpoint_every == 0:
          save_started = time.perf_counter()
          watchdog.beat(f"local checkpoint save at step {step}")
          local.save(state, train_iter)
          interval_start = time.perf_counter()
          checkpoint_s = interval_start - save_started
        stragglers.waited(compile_s + eval_s + checkpoint_s)
        ran_lengths.add(length)
        clock.add("data", data_s)
        clock.add("compile", compile_s)
        clock.add("eval", eval_s)
        clock.add("checkpoint", checkpoint_s)
        clock.step_done(step, max(time.perf_counter() - iteration_started - data_s - compile_s
                                  - eval_s - checkpoint_s, 0.0))
        if due_log:
          clock.write()
          writer.write_tensorboard(step, clock.scalars())
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
      end = "preempted" if stopped_by is not None else "done"
  finally:
    trace.close()
    train_iter.close()
    bar.close()
    writer.close()
    wait_started = time.perf_counter()
    for c in tiers:
      c.close()  # waits for a save in flight: it is committed or nothing is
    clock.add("checkpoint", time.perf_counter() - wait_started)
    clock.write(end)
  last["checkpoint_step"] = saved_step
  last["preempted_by"] = stopped_by
  last["undecodable"] = len(corpus.undecodable)
  last["rollbacks"] = rollbacks
  last["goodput"] = clock.fraction()
  last["params"] = state["params"]
  return last
