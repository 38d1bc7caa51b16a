"""One process of a multi-process CPU training run (driven by tests/test_multiprocess.py).

usage: python -m tests.multiprocess_worker PORT NUM_PROCESSES PROCESS_ID WORKDIR STOP_AT
Trains `tiny_experiment(mesh=fsdp over all devices)` and simulates preemption after STOP_AT.
"""

import os
import signal
import sys

from jaxllm.parallel import mesh as mesh_lib
from jaxllm.train import loop
from tests.helpers import tiny_experiment

FSDP = dict(data=1, fsdp=-1)


def main(port, num_processes, process_id, workdir, stop_at):
  mesh_lib.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id))

  def preempt(step):
    if step == int(stop_at):
      signal.raise_signal(signal.SIGTERM)

  result = loop.train(tiny_experiment(mesh=FSDP), workdir, progress=False, on_step=preempt)
  print(f"process {process_id}: stopped at {result['step']}, saved {result['checkpoint_step']}")


if __name__ == "__main__":
  # Set here, not at import: the test process imports FSDP from this module and must keep its
  # own 8 devices. JAX reads these when its backend starts, after this.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  main(*sys.argv[1:])
