"""Stragglers in multi-process runs: the process whose host falls behind the others.

Every step ends in collectives, so a slow host (a slow input pipeline, a busy CPU, a sick
machine) makes every other process wait for it, and all processes then show the same step
time. What differs is where each spends it: the straggler on its own host work, the others
blocked on the devices. Each process sums its host time (a step's wall time less the time it
spent dispatching the step and waiting for device results: metrics, evaluations, saves,
compilations) between log steps, and process 0 compares them.
"""

from __future__ import annotations

import time

import numpy as np
from jax.experimental import multihost_utils

# Below this much host time per step over the median, nobody counts as a straggler.
MIN_EXCESS_S = 0.01


class StragglerMonitor:
  """Host time per process between log steps; `gather` is collective (every process calls it
  at the same steps)."""

  def __init__(self, factor: float, process_count: int):
    self.on = factor > 0 and process_count > 1
    self.factor = factor
    self._host_s = self._waited_s = 0.0
    self._cycle_started: float | None = None
    self._steps = 0

  def step_starts(self) -> None:
    """A step begins: the previous step's host time is its wall time less its waits."""
    now = time.perf_counter()
    if self._cycle_started is not None:
      self._host_s += max(now - self._cycle_started - self._waited_s, 0.0)
      self._steps += 1
    self._cycle_started, self._waited_s = now, 0.0

  def waited(self, seconds: float) -> None:
    self._waited_s += seconds

  def forget(self) -> None:
    """After a rollback: the interval starts over."""
    self._host_s, self._steps, self._cycle_started = 0.0, 0, None

  def gather(self) -> dict | None:
    """{"host_s": per process, "others_s": the median of all but the slowest, "straggler": the
    slowest's index or None, "steps"} since the last call; None when off (one process, or
    factor 0)."""
    if not self.on:
      return None
    host = np.asarray(multihost_utils.process_allgather(
        np.asarray([self._host_s], np.float64))).reshape(-1)
    steps, self._host_s, self._steps = max(self._steps, 1), 0.0, 0
    worst = int(np.argmax(host))
    # against the others' median: with two processes the median of all would be their mean
    others = float(np.median(np.delete(host, worst)))
    slow = host[worst] > self.factor * others and host[worst] - others > MIN_EXCESS_S * steps
    return {"host_s": host.tolist(), "others_s": others,
            "straggler": worst if slow else None, "steps": steps}
