"""Two processes x 4 CPU devices (gloo collectives over 127.0.0.1) train and are preempted; one
process with 8 devices resumes their checkpoint on another mesh, data iterator included, and
continues on the loss trajectory of an uninterrupted single-process run (the dense run is then
preempted again and two processes finish it, one of them a straggler: 2 -> 1 -> 2). Dense with FSDP, and MoE with
experts over mesh.expert (all-to-all across the two processes)."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.train import loop
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import REPO
from tests.multiprocess_worker import FSDP, experiment


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


# kind -> (mesh of the single-process reference, mesh the resumed run uses)
RESUME = {"fsdp": (FSDP, FSDP), "moe": (dict(expert=8), dict(fsdp=4, expert=2))}


def _two_processes(workdir, stop_at, kind, slow_process=-1):
  """Two processes of 4 CPU devices train in `workdir` (resuming it) and stop at `stop_at`;
  their outputs."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(port), "2",
                             str(i), workdir, str(stop_at), kind, str(slow_process)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert f"stopped at {stop_at}, saved {stop_at}" in out, out[-3000:]
  return outputs


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RESUME))
def test_restarts_on_another_process_count_keep_the_loss_trajectory(tmp_path, kind):
  reference_mesh, resume_mesh = RESUME[kind]
  reference = str(tmp_path / "reference")
  loop.train(experiment(kind, reference_mesh), reference, progress=False)

  workdir = str(tmp_path / "multi")
  # fsdp: 2 processes to step 8, 1 process to 14, 2 processes again to the end (an elastic
  # restart both ways); moe: 2 processes to 12, 1 process to the end.
  first_stop = 8 if kind == "fsdp" else 12
  _two_processes(workdir, first_stop, kind)
  single_stop = 14 if kind == "fsdp" else None

  def preempt(step):
    if step == single_stop:
      signal.raise_signal(signal.SIGTERM)
  # 8 devices, 1 process, another mesh
  result = loop.train(experiment(kind, resume_mesh), workdir, progress=False, on_step=preempt)
  if kind == "fsdp":
    assert result["step"] == 14 and result["preempted_by"] == signal.SIGTERM
    # process 1 is slow on its host: process 0 names it at its log steps
    outputs = _two_processes(workdir, 20, kind, slow_process=1)
    assert "straggler: process 1 spent" in outputs[0], outputs[0][-3000:]
    assert "straggler" not in outputs[1]  # only process 0 speaks
  else:
    assert result["step"] == 20
  got, want = _losses(workdir), _losses(reference)
  assert sorted(got) == list(range(1, 21))
  np.testing.assert_allclose([got[s] for s in range(1, 21)], [want[s] for s in range(1, 21)],
                             rtol=1e-5)
  if kind == "moe":  # router metrics per MoE layer, in metrics.jsonl and TensorBoard
    with open(os.path.join(workdir, METRICS_FILE)) as f:
      last = [r for r in map(json.loads, f) if "loss" in r][-1]
    load = np.asarray(last["moe_load"])
    assert load.shape == (2, 8) and np.allclose(load.sum(axis=1), 1.0)
    assert len(last["moe_load_entropy"]) == 2 and all(1.0 <= m <= 8.0
                                                     for m in last["moe_max_load"])
    assert 0 < last["moe_aux_loss"] < 8 and last["moe_dropped"] == 0.0
    assert os.listdir(os.path.join(workdir, "tb"))
