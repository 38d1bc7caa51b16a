"""Training: loss falls, exact resume after preemption and kills, damaged checkpoints passed
over, refusals that keep checkpoints safe."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import jax

from jaxllm import config as config_lib
from jaxllm.model import transformer
from jaxllm.train import goodput, loop, optim, step as step_lib
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import REPO, tiny_experiment


def _losses(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = loop.train(tiny_experiment(), workdir, progress=False)
  return workdir, result


def test_short_run_loss_falls_and_workdir_is_complete(straight_run):
  workdir, result = straight_run
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 21))
  assert np.mean([losses[s] for s in range(16, 21)]) < losses[1] - 0.5
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "checkpoints", "tb"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tb"))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [10, 20]
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    evals = [json.loads(l) for l in f if "eval_loss" in l]
  assert [e["step"] for e in evals] == [10, 20]
  assert all(np.isclose(e["eval_ppl"], np.exp(e["eval_loss"])) for e in evals)
  assert result["preempted_by"] is None and result["checkpoint_step"] == 20


def test_resume_after_preemption_is_bitwise_exact(straight_run, tmp_path):
  straight_dir, straight = straight_run
  workdir = str(tmp_path / "resumed")

  def preempt_at_13(step):
    if step == 13:
      signal.raise_signal(signal.SIGTERM)

  first = loop.train(tiny_experiment(), workdir, progress=False, on_step=preempt_at_13)
  assert first["preempted_by"] == signal.SIGTERM and first["checkpoint_step"] == 13
  second = loop.train(tiny_experiment(), workdir, progress=False)
  assert second["step"] == 20
  want, got = _losses(straight_dir), _losses(workdir)
  assert sorted(got) == list(range(1, 21))  # the file reads as one run, no duplicates
  for s in range(1, 21):
    assert got[s] == want[s], (s, got[s], want[s])
  chex.assert_trees_all_equal(jax.device_get(second["params"]),
                              jax.device_get(straight["params"]))


# A run killed (SIGKILL: no handler, no flush) while orbax commits its step-15 checkpoint in
# the background (train.async_checkpoint): everything is written into its temporary directory,
# which is about to be renamed into place, while the main thread trains on. A half-written
# metrics line is appended as a kill mid-write would leave it.
_KILLED_DURING_SAVE = """
import os, shutil, signal, sys

def kill_before_commit(real):
  def rename(src, dst, *args, **kwargs):
    dst = os.fspath(dst)
    if os.path.basename(dst) == "15" and os.path.basename(os.path.dirname(dst)) == "checkpoints":
      with open(os.path.join(sys.argv[1], "metrics.jsonl"), "a") as f:
        f.write('{"loss": 1.0, "st')
      os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
  return rename

os.rename, os.replace, shutil.move = (kill_before_commit(f)
                                      for f in (os.rename, os.replace, shutil.move))
from jaxllm.train import loop
from tests.helpers import REPO, tiny_experiment
loop.train(tiny_experiment(train=dict(checkpoint_every=5)), sys.argv[1], progress=False)
"""

# The same run resumed, and killed by the test at a moment it draws at random; a short pause
# after each step keeps the run from ending before the kill.
_RESUMED = """
import sys, time
from jaxllm.train import loop
from tests.helpers import tiny_experiment
loop.train(tiny_experiment(train=dict(checkpoint_every=5)), sys.argv[1], progress=False,
           on_step=lambda step: time.sleep(0.05))
"""


def _wait_for_session(workdir, session, proc, timeout=300):
  """Until the run in `proc` has written a goodput record of session `session`."""
  began = time.monotonic()
  while time.monotonic() - began < timeout and proc.poll() is None:
    records = goodput.read_records(workdir)
    if any(r["session"] == session for r in records):
      return
    time.sleep(0.02)
  raise AssertionError(f"no goodput record of session {session}: {proc.poll()}")


def test_kills_during_an_async_save_and_at_random_resume_exactly(straight_run, tmp_path):
  straight_dir, straight = straight_run
  workdir = str(tmp_path / "killed")
  proc = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, workdir], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [5, 10]  # step 15 never committed
  delay = random.uniform(0.0, 0.4)
  proc = subprocess.Popen([sys.executable, "-c", _RESUMED, workdir], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_session(workdir, 2, proc)
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL, (delay, err[-3000:])
  third = loop.train(tiny_experiment(train=dict(checkpoint_every=5)), workdir, progress=False)
  assert third["step"] == 20 and third["checkpoint_step"] == 20
  want, got = _losses(straight_dir), _losses(workdir)
  assert sorted(got) == list(range(1, 21))  # the cut line and the lost steps' lines are gone
  for s in range(1, 21):
    assert got[s] == want[s], (delay, s, got[s], want[s])
  chex.assert_trees_all_equal(jax.device_get(third["params"]),
                              jax.device_get(straight["params"]))
  proc = subprocess.run([sys.executable, "-m", "jaxllm.goodput", workdir], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["restarts"] == 2 and summary["steps"] == 20, summary
  # the first run trained steps 11..15 at least before its kill; they were all trained again
  assert summary["redone_steps"] >= 5 and 0 < summary["goodput"] < 1, summary
  assert summary["compile_s"] > 0 and summary["restore_s"] > 0 and summary["checkpoint_s"] > 0


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(straight_run, tmp_path,
                                                                      capsys):
  straight_dir, straight = straight_run
  workdir = str(tmp_path / "damaged")
  shutil.copytree(straight_dir, workdir)
  # Step 20's parameter files cut to half their size, as a disk that filled up leaves them.
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "20", "params")):
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
  capsys.readouterr()
  result = loop.train(tiny_experiment(), workdir, progress=False)
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and warnings[0].startswith(
      f"warning: checkpoint step 20 in {workdir}/checkpoints cannot be read (")
  assert warnings[0].endswith(f"moved to {workdir}/corrupt_checkpoints/20; resuming from step 10")
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints", "20"))  # kept, not deleted
  assert result["checkpoint_step"] == 20
  want, got = _losses(straight_dir), _losses(workdir)
  assert sorted(got) == list(range(1, 21))
  for s in range(1, 21):
    assert got[s] == want[s], (s, got[s], want[s])
  chex.assert_trees_all_equal(jax.device_get(result["params"]),
                              jax.device_get(straight["params"]))


def test_a_crash_resumes_from_the_newer_local_tier(straight_run, tmp_path, capsys):
  straight_dir, straight = straight_run
  workdir, local_dir = str(tmp_path / "run"), str(tmp_path / "local")
  cfg = tiny_experiment(train=dict(local_checkpoint_dir=local_dir, local_checkpoint_every=3))

  def crash(step):
    if step == 14:
      raise RuntimeError("host lost")
  with pytest.raises(RuntimeError, match="host lost"):
    loop.train(cfg, workdir, progress=False, on_step=crash)

  def steps(d):
    return sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit())
  assert steps(workdir) == [10] and steps(local_dir) == [9, 12]
  capsys.readouterr()
  result = loop.train(cfg, workdir, progress=False)
  assert (f"resuming from checkpoint step 12 (local tier, {local_dir})"
          in capsys.readouterr().err)
  want, got = _losses(straight_dir), _losses(workdir)
  assert sorted(got) == list(range(1, 21))
  for s in range(1, 21):
    assert got[s] == want[s], (s, got[s], want[s])
  chex.assert_trees_all_equal(jax.device_get(result["params"]),
                              jax.device_get(straight["params"]))
  with pytest.raises(config_lib.ConfigError, match="holds the checkpoints of another workdir"):
    loop.train(cfg, str(tmp_path / "other"), progress=False)


def test_resume_with_other_shapes_is_refused_and_keeps_checkpoints(straight_run):
  workdir, _ = straight_run
  ckpt = os.path.join(workdir, "checkpoints")
  before = {name: os.stat(os.path.join(ckpt, name)).st_mtime_ns for name in os.listdir(ckpt)}
  config_before = open(os.path.join(workdir, "config.json")).read()
  other = tiny_experiment(model=dict(d_model=48, head_dim=12))
  with pytest.raises(config_lib.ConfigError, match="model.d_model=48 differs from 32"):
    loop.train(other, workdir, progress=False)
  after = {name: os.stat(os.path.join(ckpt, name)).st_mtime_ns for name in os.listdir(ckpt)}
  assert before == after
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_divergence_stops_after_its_rollbacks_without_saving(tmp_path):
  cfg = tiny_experiment(train=dict(lr=1e30, warmup_steps=0, clip_norm=0.0, steps=10,
                                   checkpoint_every=5, eval_every=5))
  with pytest.raises(loop.TrainingDiverged,
                     match=r"non-finite .* at step 2; 3 rollbacks so far \(train.rollback_limit=3\); "
                     r"no checkpoint yet"):
    loop.train(cfg, str(tmp_path), progress=False)
  ckpt = tmp_path / "checkpoints"
  assert not ckpt.exists() or not [s for s in os.listdir(ckpt) if s.isdigit()]


def _batch(B, T, vocab, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(B, T + 1)).astype(np.int32)
  weights = np.ones((B, T), np.float32)
  weights[0, :3] = 0  # uneven weights make accumulation order matter
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def test_gradient_accumulation_equals_one_big_batch():
  base = tiny_experiment(train=dict(batch_size=8, grad_accum=1))
  cfg = base.model
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  batch = _batch(8, 16, cfg.vocab_size, 0)
  results = []
  for accum in (1, 4):
    tcfg = tiny_experiment(train=dict(batch_size=8, grad_accum=accum)).train
    opt = optim.make_optimizer(tcfg)
    state = step_lib.init_state(params, opt, 0)
    step = jax.jit(step_lib.make_train_step(graphdef, opt, tcfg))
    results.append(step(state, batch))
  np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-6)
  chex.assert_trees_all_close(results[0][0]["params"], results[1][0]["params"], atol=1e-6)


def test_weight_decay_mask_spares_norms_and_embeddings():
  cfg = tiny_experiment(model=dict(tie_embeddings=False)).model
  _, params = transformer.abstract_params(cfg)
  mask = optim.decay_mask(params)
  assert mask["embed"] is False
  assert mask["final_norm"]["scale"] is False
  assert mask["blocks"]["attn_norm"]["scale"] is False
  assert mask["blocks"]["attn"]["q"] is True and mask["blocks"]["mlp"]["down"] is True
  assert mask["lm_head"] is True


def test_schedule_warms_up_then_decays_to_floor():
  tcfg = tiny_experiment(train=dict(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)).train
  sched = optim.learning_rate_schedule(tcfg)
  assert float(sched(0)) == 0.0 and np.isclose(float(sched(10)), 1.0)
  assert np.isclose(float(sched(100)), 0.1) and float(sched(55)) < 1.0


def test_pallas_attention_trains_like_xla(tmp_path):
  """model.attention_impl=pallas (the flash kernel, interpreted on CPU) gives the xla losses."""
  model = dict(d_model=64, n_heads=2, n_kv_heads=1, head_dim=64)
  train = dict(steps=5, eval_every=100, checkpoint_every=100)
  losses = {}
  for impl in ("xla", "pallas"):
    cfg = tiny_experiment(model=dict(model, attention_impl=impl), train=train)
    loop.train(cfg, str(tmp_path / impl), progress=False)
    losses[impl] = _losses(str(tmp_path / impl))
  assert sorted(losses["pallas"]) == list(range(1, 6))
  np.testing.assert_allclose([losses["pallas"][s] for s in range(1, 6)],
                             [losses["xla"][s] for s in range(1, 6)], rtol=1e-5)
