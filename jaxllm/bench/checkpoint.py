"""`jaxllm.bench checkpoint`: what checkpointing costs a training run.

The configured train step runs `steps` steps with no saves, with synchronous saves every
`save_every` steps and with asynchronous ones (orbax writing in the background), the three in
turn for `rounds` rounds (the machine's speed drifts; medians are compared); the overhead of
each is the median over rounds of its time over the same round's no-save time (rounds differ
more from each other than the modes do). Then one checkpoint is restored from the disk the
workdir is on and from host RAM (`/dev/shm`, a local tier's best case).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import jax

from jaxllm import config as config_lib
from jaxllm.bench import train as train_bench
from jaxllm.checkpoint.orbax import Checkpointer
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules
from jaxllm.train import loop

MODES = ("none", "sync", "async")


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def run(cfg: config_lib.Config, *, steps: int = 10, save_every: int = 5, rounds: int = 3,
        disk_dir: str | None = None, ram_dir: str = "/dev/shm") -> dict:
  config_lib.validate_for_devices(cfg, jax.device_count(), jax.default_backend())
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abstract, shardings, optimizer = loop.state_shardings(cfg, mesh)
  batch_sh = rules.batch_sharding(mesh)
  batch = train_bench.synthetic_batch(cfg, batch_sh)
  train_step = mesh_lib.under_mesh(
      loop.jit_train_step(cfg, graphdef, optimizer, shardings, batch_sh), mesh)
  state = loop.initial_state(cfg, optimizer, shardings)
  for _ in range(2):  # compile, warm up
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  disk_root = tempfile.mkdtemp(prefix="jaxllm-bench-ckpt-", dir=disk_dir or os.getcwd())
  totals = {mode: [] for mode in MODES}
  blocking = {mode: [] for mode in MODES[1:]}
  try:
    for r in range(rounds):
      for mode in MODES:
        checkpointer = None if mode == "none" else Checkpointer(
            os.path.join(disk_root, f"{mode}{r}"), keep=2, async_save=mode == "async")
        started = time.perf_counter()
        for i in range(1, steps + 1):
          state, metrics = train_step(state, batch)
          if checkpointer is not None and i % save_every == 0:
            # the save reads the state: the queued steps end first, which is not the save's cost
            jax.block_until_ready(state)
            save_started = time.perf_counter()
            checkpointer.save(state)
            blocking[mode].append(time.perf_counter() - save_started)
        jax.block_until_ready(metrics)
        if checkpointer is not None:
          checkpointer.wait()  # a save still being written is part of what the mode costs
        totals[mode].append(time.perf_counter() - started)
        if checkpointer is not None:
          checkpointer.close()
    last = os.path.join(disk_root, f"sync{rounds - 1}")
    step = Checkpointer(last, read_only=True).latest_step()
    size = _directory_bytes(os.path.join(last, str(step)))
    restore = {"disk": _restore_seconds(last, abstract, shardings)}
    if os.path.isdir(ram_dir):
      ram_copy = tempfile.mkdtemp(prefix="jaxllm-bench-ckpt-", dir=ram_dir)
      try:
        shutil.copytree(last, os.path.join(ram_copy, "c"))
        restore["ram"] = _restore_seconds(os.path.join(ram_copy, "c"), abstract, shardings)
      finally:
        shutil.rmtree(ram_copy, ignore_errors=True)
  finally:
    shutil.rmtree(disk_root, ignore_errors=True)
  return {
      "suite": "checkpoint", "config": cfg.name, "backend": jax.default_backend(),
      "devices": jax.device_count(), "jax": jax.__version__,
      "params": sum(x.size for x in jax.tree.leaves(abstract["params"])),
      "checkpoint_bytes": size, "steps": steps, "save_every": save_every, "rounds": rounds,
      "seconds": {mode: statistics.median(t) for mode, t in totals.items()},
      "seconds_all": totals,
      "overhead": {mode: statistics.median(t / n for t, n in zip(totals[mode], totals["none"]))
                   - 1 for mode in MODES[1:]},
      "save_blocking_s": {mode: statistics.median(b) for mode, b in blocking.items()},
      "restore_s": restore,
  }


def _restore_seconds(directory: str, abstract, shardings, repeats: int = 3) -> float:
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  checkpointer = Checkpointer(directory, read_only=True)
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(checkpointer.restore(target))
    times.append(time.perf_counter() - started)
  checkpointer.close()
  return statistics.median(times)


def table(result: dict) -> str:
  n, every = result["steps"], result["save_every"]
  lines = [f"{result['config']}: {result['params'] / 1e6:.2f}M params, checkpoint "
           f"{result['checkpoint_bytes'] / 2**20:.1f} MiB; {n} steps per round, a save every "
           f"{every}, median of {result['rounds']} rounds ({result['backend']}, jax "
           f"{result['jax']})",
           f"{'saves':<6} {'seconds':>8} {'overhead':>9} {'step waits per save':>20}"]
  for mode in MODES:
    overhead = "" if mode == "none" else f"{result['overhead'][mode]:+9.1%}"
    wait = "" if mode == "none" else f"{result['save_blocking_s'][mode] * 1e3:17.1f} ms"
    lines.append(f"{mode:<6} {result['seconds'][mode]:8.2f} {overhead:>9} {wait:>20}")
  lines.append("restore: " + ", ".join(f"{tier} {s * 1e3:.0f} ms"
                                       for tier, s in result["restore_s"].items()))
  return "\n".join(lines)
