"""Faults injected into training: NaN gradients and loss spikes rolled back and skipped, hangs
reported by the watchdog, goodput accounted over restarts."""

import json
import os
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import jax

from jaxllm.train import goodput, loop, recovery, watchdog
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import REPO, tiny_experiment


def _losses(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_nan_gradient_and_a_loss_spike_are_rolled_back_and_their_batches_skipped(tmp_path):
  # A spike is a loss 1.15x its median over 5 steps; the tiny run's losses move by under 3%
  # from step to step, and a batch of constant targets at step 14 raises it by about 20%.
  train = dict(checkpoint_every=5, spike_loss_factor=1.15, spike_window=5)
  poisoned, seen = set(), {}

  def inject(step, batch):
    """Step 8's batch has NaN weights, step 14's one target everywhere (each bad the first time
    the step draws it: the batch drawn in its place after the rollback is clean)."""
    seen.setdefault(step, []).append(batch["inputs"].copy())
    if step in (8, 14) and step not in poisoned:
      poisoned.add(step)
      batch = dict(batch)
      if step == 8:
        batch["weights"] = np.full_like(batch["weights"], np.nan)
      else:
        batch["targets"] = np.full_like(batch["targets"], 7)
    return batch

  faulty_dir, clean_dir = str(tmp_path / "faulty"), str(tmp_path / "clean")
  faulty = loop.train(tiny_experiment(train=train), faulty_dir, progress=False, on_batch=inject)
  # The run that never saw those batches: the same config told to skip them.
  clean = loop.train(tiny_experiment(train=dict(train, skip_steps="8,14")), clean_dir,
                     progress=False)
  assert faulty["rollbacks"] == 2 and clean["rollbacks"] == 0
  # Trained again after a rollback, steps 6, 7 and 11-13 drew their own batches again; steps 8
  # and 14 drew the next ones.
  assert sorted(s for s, drawn in seen.items() if len(drawn) == 2) == [6, 7, 8, 11, 12, 13, 14]
  for s in (6, 7, 11, 12, 13):
    np.testing.assert_array_equal(seen[s][0], seen[s][1])
  for s in (8, 14):
    assert not np.array_equal(seen[s][0], seen[s][1]), s
  want, got = _losses(clean_dir), _losses(faulty_dir)
  assert sorted(got) == list(range(1, 21))  # the rolled-back steps' lines were rewound
  for s in range(1, 21):
    assert got[s] == want[s], (s, got[s], want[s])
  chex.assert_trees_all_equal(jax.device_get(faulty["params"]), jax.device_get(clean["params"]))
  with open(os.path.join(faulty_dir, recovery.SKIPS_FILE)) as f:
    skipped = json.load(f)["skipped"]
  assert [r["step"] for r in skipped] == [8, 14]
  assert skipped[0]["reason"].startswith("non-finite loss nan")
  assert skipped[1]["reason"].startswith("loss ") and "above 1.15 x its median" in \
      skipped[1]["reason"]
  summary = goodput.summarize(goodput.read_records(faulty_dir))
  # back to 5 from 8 (6, 7 again), back to 10 from 14 (11, 12, 13 again)
  assert summary["rollbacks"] == 2 and summary["redone_steps"] == 5
  assert summary["restarts"] == 0 and summary["restore_s"] > 0


def test_the_watchdog_reports_a_hung_phase_within_its_timeout():
  lines = []
  with watchdog.Watchdog(0.3, process_index=3, report=lines.append, poll_s=0.02) as dog:
    dog.beat(None)  # a compiling step is not timed
    time.sleep(0.5)
    assert not lines
    dog.beat("step 7")
    began = time.monotonic()
    while not lines and time.monotonic() - began < 10:
      time.sleep(0.01)
    reported_after = time.monotonic() - began
    time.sleep(0.2)
  assert len(lines) == 1, lines  # once per phase
  assert lines[0].startswith("watchdog: process 3: step 7 has run ")
  # reported after the timeout, within it plus the polling (a loaded machine given 2 s)
  assert 0.3 <= reported_after < 2.3, reported_after


_HUNG = """
import time
from jaxllm.train import watchdog
with watchdog.Watchdog(0.2, 0, exit_code=watchdog.EXIT_CODE) as dog:
  dog.beat("checkpoint save at step 40")
  time.sleep(60)
"""


def test_the_watchdog_exits_for_a_supervisor_with_every_stack():
  proc = subprocess.run([sys.executable, "-c", _HUNG], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == watchdog.EXIT_CODE == 75, proc.stderr[-2000:]
  assert ("watchdog: process 0: checkpoint save at step 40 has run" in proc.stderr
          and "exiting with status 75" in proc.stderr)
  assert 'File "<string>", line 6' in proc.stderr  # the hung main thread's stack


def test_a_training_step_that_hangs_is_reported(tmp_path, capsys):
  cfg = tiny_experiment(train=dict(steps=3, eval_every=100, checkpoint_every=100,
                                   watchdog_s=0.5))

  def hang(step):
    if step == 2:
      time.sleep(1.5)
  loop.train(cfg, str(tmp_path), progress=False, on_step=hang)
  err = capsys.readouterr().err
  assert "watchdog: process 0: step 2 has run " in err and "train.watchdog_s=0.5" in err


def test_goodput_sums_the_last_record_of_each_session():
  base = dict(compile_s=0.0, checkpoint_s=0.0, restore_s=0.0, data_s=0.0, eval_s=0.0,
              startup_s=0.0, redone_s=0.0, rollbacks=0)
  records = [
      dict(base, session=1, started=100.0, time=110.0, step=10, high_water=10, end="running",
           productive_s=6.0, compile_s=2.0, redone_steps=0),
      dict(base, session=1, started=100.0, time=130.0, step=25, high_water=25, end="running",
           productive_s=20.0, compile_s=2.0, checkpoint_s=1.0, redone_steps=0),
      dict(base, session=2, started=200.0, time=240.0, step=40, high_water=40, end="done",
           productive_s=20.0, redone_s=5.0, compile_s=2.0, restore_s=3.0, startup_s=4.0,
           redone_steps=5, rollbacks=1),
  ]
  s = goodput.summarize(records)
  assert s["restarts"] == 1 and s["steps"] == 40 and s["redone_steps"] == 5
  assert s["wall_s"] == pytest.approx(30.0 + 40.0)
  assert s["goodput"] == pytest.approx(40.0 / 70.0)
  assert s["compile_s"] == 4.0 and s["restore_s"] == 3.0 and s["rollbacks"] == 1
  # what no part claims: 70 s less 40 + 5 + 4 + 1 + 3 + 4
  assert s["other_s"] == pytest.approx(70.0 - 57.0)
  assert [x["end"] for x in s["sessions"]] == ["running", "done"]
