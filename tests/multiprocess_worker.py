"""One process of a multi-process CPU training run (driven by tests/test_multiprocess.py).

usage: python -m tests.multiprocess_worker PORT NUM_PROCESSES PROCESS_ID WORKDIR STOP_AT [KIND]
    [SLOW_PROCESS]
Trains `EXPERIMENTS[KIND]` (default "fsdp": the dense model, FSDP over all devices; "moe": an
MoE model with experts over mesh.expert) and simulates preemption after STOP_AT; process
SLOW_PROCESS (if given) spends 0.3 s of host time after each step, a straggler.
"""

import os
import signal
import sys
import time

from jaxllm.parallel import mesh as mesh_lib
from jaxllm.train import loop
from tests.helpers import tiny_experiment, xla_flags

FSDP = dict(data=1, fsdp=-1)
MOE_MODEL = dict(n_experts=8, experts_per_token=2, moe_d_ff=32, n_shared_experts=1)


def experiment(kind: str, mesh: dict):
  if kind == "moe":
    return tiny_experiment(mesh={"data": 1, **mesh}, model=MOE_MODEL)
  return tiny_experiment(mesh=mesh)


# kind -> the mesh of the two-process run (8 devices in all)
EXPERIMENTS = {"fsdp": FSDP, "moe": dict(fsdp=2, expert=4)}


def main(port, num_processes, process_id, workdir, stop_at, kind="fsdp", slow_process="-1"):
  mesh_lib.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id))

  def preempt(step):
    if int(process_id) == int(slow_process):
      time.sleep(0.3)
    if step == int(stop_at):
      signal.raise_signal(signal.SIGTERM)

  result = loop.train(experiment(kind, EXPERIMENTS[kind]), workdir, progress=False,
                      on_step=preempt)
  print(f"process {process_id}: stopped at {result['step']}, saved {result['checkpoint_step']}")


if __name__ == "__main__":
  # Set here, not at import: the test process imports FSDP from this module and must keep its
  # own 8 devices. JAX reads these when its backend starts, after this.
  os.environ["XLA_FLAGS"] = xla_flags(devices=4)
  os.environ["JAX_PLATFORMS"] = "cpu"
  main(*sys.argv[1:])
