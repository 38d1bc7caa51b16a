"""Wall-clock timing shared by the benchmark suites and the tuning tools."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def median_seconds(fn, args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls, each waited for, after one call that
  compiles and warms up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """This machine's memory bandwidth as a bare copy measures it: bytes read plus bytes written
  per second (GB/s) by the best of `repeats` numpy copies of `nbytes` (far beyond the caches).
  Decoding at batch 1 reads every weight once per token, so bytes per token / this is the
  fastest a token can be on a CPU."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # pages faulted in before timing
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best / 1e9
