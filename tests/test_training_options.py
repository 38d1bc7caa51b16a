"""float16 training with dynamic loss scaling, ZeRO in the training loop, profiling and the
compile log: each against float32 / an uninterrupted run / its own files."""

import glob
import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.model import transformer
from jaxllm.train import loop, loss_scale, metrics as metrics_lib, optim, profiling
from jaxllm.train import step as step_lib
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import tiny_experiment
from tests.test_train import _batch


def _steps(cfg):
  graphdef, params = transformer.split(transformer.create(cfg.model, 0))
  optimizer = optim.make_optimizer(cfg.train)
  return loop.fresh_state(cfg, params, optimizer), jax.jit(
      step_lib.make_train_step(graphdef, optimizer, cfg.train))


def _max_relative(tree, want):
  return max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
             for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want)))


def test_float16_with_loss_scaling_trains_like_float32():
  """50 steps of the tiny model: float16 compute with dynamic scaling (a period of 10 steps,
  so the scale grows; a one-off run saw one overflow skipped on the way) follows float32
  within 1e-4 of the loss and 5e-3 of each parameter (measured: 4e-6 and 8e-4)."""
  runs = {}
  for dtype in ("float32", "float16"):
    cfg = tiny_experiment(model=dict(dtype=dtype),
                          train=dict(warmup_steps=5, steps=50, loss_scale_period=10))
    state, step = _steps(cfg)
    assert ("loss_scale" in state) == (dtype == "float16")  # "auto": scaled under float16
    losses, skipped = [], 0
    for i in range(50):
      state, metrics = step(state, _batch(8, 32, cfg.model.vocab_size, i % 5))
      losses.append(float(metrics["loss"]))
      skipped += float(metrics.get("skipped", 0.0))
    runs[dtype] = np.asarray(losses), state, skipped
  (want, want_state, _), (got, state, skipped) = runs["float32"], runs["float16"]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert _max_relative(state["params"], want_state["params"]) < 5e-3
  # Doubled after every 10 finite steps in a row from 2^15, halved by each overflow.
  assert float(state["loss_scale"]["scale"]) >= 2.0 ** 17


def test_a_step_with_an_inf_is_skipped_and_leaves_the_state_intact():
  cfg = tiny_experiment(model=dict(dtype="float16"))
  state, step = _steps(cfg)
  state, _ = step(state, _batch(8, 32, cfg.model.vocab_size, 0))
  before = jax.device_get(state)
  bad = _batch(8, 32, cfg.model.vocab_size, 1)
  bad["weights"][3, 5] = np.inf  # one token's loss weight: the loss and gradients are inf/nan
  after, metrics = step(state, bad)
  assert float(metrics["skipped"]) == 1.0
  chex.assert_trees_all_equal(jax.device_get(after["params"]), before["params"])
  chex.assert_trees_all_equal(jax.device_get(after["opt_state"]), before["opt_state"])
  assert float(after["loss_scale"]["scale"]) == before["loss_scale"]["scale"] / 2
  assert int(after["loss_scale"]["good_steps"]) == 0 and int(after["step"]) == 2
  # An overflow of the float16 backward itself: a scale of 2^100 saturates the cotangents.
  huge = dict(after, loss_scale=loss_scale.init(2.0 ** 100))
  _, metrics = step(huge, _batch(8, 32, cfg.model.vocab_size, 2))
  assert float(metrics["skipped"]) == 1.0
  # The next good batch trains again.
  after, metrics = step(after, _batch(8, 32, cfg.model.vocab_size, 3))
  assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["grad_norm"]))
  assert _max_relative(after["params"], before["params"]) > 0


def test_loss_scale_grows_after_a_period_and_never_falls_below_one():
  state = loss_scale.init(4.0)
  finite, overflow = jnp.asarray(True), jnp.asarray(False)
  state = loss_scale.adjust(loss_scale.adjust(state, finite, 2), finite, 2)
  assert float(state["scale"]) == 8.0 and int(state["good_steps"]) == 0
  for _ in range(5):
    state = loss_scale.adjust(state, overflow, 2)
  assert float(state["scale"]) == 1.0


def _rows(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


OPTIONS = dict(model=dict(dtype="float16"), mesh=dict(data=-1, zero_stage=2),
               train=dict(profile_steps="3,2"))


@pytest.fixture(scope="module")
def options_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("options"))
  return workdir, loop.train(tiny_experiment(**OPTIONS), workdir, progress=False)


def test_options_run_is_profiled_and_logs_its_compilations(options_run):
  workdir, result = options_run
  # TensorBoard's profile plugin lists the runs under tb/plugins/profile/<run>/.
  traces = glob.glob(os.path.join(workdir, "tb", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  rows = _rows(workdir)
  compiles = [r for r in rows if "compile" in r]
  assert [(r["compile"], r["step"], r["compiles"]) for r in compiles] == [
      ("train_step", 1, 1), ("eval_step", 10, 1)]
  assert all(r["compile_s"] > 0 and not r.get("recompiled") for r in compiles)
  scales = [r["loss_scale"] for r in rows if "loss_scale" in r]
  assert len(scales) == 20 and scales[0] == 2.0 ** 15
  assert result["step"] == 20 and np.isfinite(result["eval_loss"])


def test_options_run_resumes_bitwise(options_run, tmp_path):
  """float16 + loss scale + ZeRO-2 on 8 devices, preempted at step 13 and resumed: the same
  losses, scales and parameters as the uninterrupted run."""
  straight_dir, straight = options_run
  workdir = str(tmp_path / "resumed")

  def preempt_at_13(step):
    if step == 13:
      signal.raise_signal(signal.SIGTERM)

  first = loop.train(tiny_experiment(**OPTIONS), workdir, progress=False, on_step=preempt_at_13)
  assert first["checkpoint_step"] == 13
  second = loop.train(tiny_experiment(**OPTIONS), workdir, progress=False)
  assert second["step"] == 20

  def series(rows):
    return [(r["step"], r["loss"], r["loss_scale"]) for r in rows if "loss" in r]
  assert series(_rows(workdir)) == series(_rows(straight_dir))
  chex.assert_trees_all_equal(jax.device_get(second["params"]),
                              jax.device_get(straight["params"]))
  # The resumed run compiled its step once more (a new process would too): no recompile.
  assert not [r for r in _rows(workdir) if r.get("recompiled")]


def test_1f1b_with_zero1_resumes_bitwise(tmp_path):
  """The training loop under 1F1B (2 stages x 4 data replicas, ZeRO-1), preempted at step 7
  and resumed: the uninterrupted run's losses and parameters, bit for bit."""
  cfg = tiny_experiment(mesh=dict(data=4, stage=2, zero_stage=1),
                        train=dict(steps=10, microbatches=2, pipeline_schedule="1f1b",
                                   checkpoint_every=5, eval_every=5))
  straight = loop.train(cfg, str(tmp_path / "straight"), progress=False)

  def preempt_at_7(step):
    if step == 7:
      signal.raise_signal(signal.SIGTERM)

  workdir = str(tmp_path / "resumed")
  assert loop.train(cfg, workdir, progress=False, on_step=preempt_at_7)["checkpoint_step"] == 7
  resumed = loop.train(cfg, workdir, progress=False)

  def series(rows):
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]
  assert series(_rows(workdir)) == series(_rows(str(tmp_path / "straight")))
  assert len(series(_rows(workdir))) == 10
  chex.assert_trees_all_equal(jax.device_get(resumed["params"]),
                              jax.device_get(straight["params"]))


def test_resume_refuses_to_toggle_loss_scaling(options_run):
  workdir, _ = options_run
  other = tiny_experiment(**{**OPTIONS, "train": dict(loss_scaling="none")})
  with pytest.raises(config_lib.ConfigError, match="loss scaling is off"):
    loop.train(other, workdir, progress=False)


def test_a_second_compilation_for_the_same_inputs_is_a_warning(tmp_path, caplog):
  """A train step compiled again for a row length it has run before is flagged (a new length
  of train.seq_len_schedule is not)."""
  def train_step(x):
    return x * 2
  step = jax.jit(train_step)
  writer = metrics_lib.MetricsWriter(str(tmp_path / "m.jsonl"), None)
  seen: set[int] = set()
  with profiling.CompileLog(("train_step",)) as log:
    step(jnp.ones(3))
    loop.log_compiles(log, writer, 1, 32, seen)
    step(jnp.ones(3))  # cached: nothing to log
    loop.log_compiles(log, writer, 2, 32, seen)
    step(jnp.ones(6))  # a new length: expected
    loop.log_compiles(log, writer, 3, 64, seen)
    step(jnp.ones(3, jnp.int32))  # the same length, another dtype: a recompilation
    with caplog.at_level("WARNING"):
      loop.log_compiles(log, writer, 4, 32, seen)
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
  assert [(r["step"], r["compiles"], r.get("recompiled", False)) for r in rows] == [
      (1, 1, False), (3, 2, False), (4, 3, True)]
  assert "train_step compiled again at step 4" in caplog.text


def test_remat_every_nth_layer_sits_between_none_and_full():
  """model.remat_every=2 rematerialises layers 0 and 2 of 4: the same gradients as no remat,
  compiled temporaries and the plan's activation estimate between remat none and full on
  every layer (measured 5.05 / 3.69 / 1.53 MB)."""
  from jaxllm.planner import aot, plan as plan_lib
  grads, temps, planned = {}, {}, {}
  batch = _batch(8, 32, 384, 0)
  for remat, every in (("none", 1), ("full", 2), ("full", 1)):
    cfg = tiny_experiment(model=dict(n_layers=4, remat=remat, remat_every=every,
                                     dtype="float32"), mesh=dict(data=1))
    graphdef, params = transformer.split(transformer.create(cfg.model, 0))
    grads[remat, every] = jax.jit(jax.grad(
        lambda p, b: step_lib.batch_loss(graphdef, p, b, cfg.train)[0]))(params, batch)
    temps[remat, every] = aot.compile_train_step(cfg, jax.devices()[:1])["temp_bytes"]
    planned[remat, every] = plan_lib.plan(cfg, 1, compile_check=False)["activation_bytes"]
  chex.assert_trees_all_close(grads["full", 2], grads["none", 1], atol=1e-6)
  for figures in (temps, planned):
    assert figures["full", 1] < figures["full", 2] < figures["none", 1], figures
