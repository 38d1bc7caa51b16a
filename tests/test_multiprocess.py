"""Two processes x 4 CPU devices (gloo collectives over 127.0.0.1) train with FSDP and are
preempted; one process with 8 devices resumes their checkpoint, data iterator included, and
continues on the loss trajectory of an uninterrupted single-process run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.train import loop
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import REPO, tiny_experiment
from tests.multiprocess_worker import FSDP


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_two_processes_save_and_one_process_resumes(tmp_path):
  reference = str(tmp_path / "reference")
  loop.train(tiny_experiment(mesh=FSDP), reference, progress=False)

  workdir = str(tmp_path / "multi")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(port), "2",
                             str(i), workdir, "12"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "stopped at 12, saved 12" in out, out[-3000:]

  result = loop.train(tiny_experiment(mesh=FSDP), workdir, progress=False)  # 8 devices, 1 process
  assert result["step"] == 20
  got, want = _losses(workdir), _losses(reference)
  assert sorted(got) == list(range(1, 21))
  np.testing.assert_allclose([got[s] for s in range(1, 21)], [want[s] for s in range(1, 21)],
                             rtol=1e-5)
