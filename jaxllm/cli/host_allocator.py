"""Keeps freed host memory inside the process on CPU-only Linux hosts, for XLA:CPU's steps.

XLA:CPU allocates each execution's temporaries as one block (382 MB for the default
experiment's train step) and frees it when the step ends. glibc's malloc serves blocks above
32 MB with a fresh `mmap` and gives them back to the kernel on free, so every step faults the
whole block in again, a page at a time, and the kernel zeroes each page: on a 2-core host that
was 93,000 page faults and about 250 ms of kernel time per train step, 17% of the step's CPU
time (`python -m jaxllm.bench train` reports both per step; `--nokeep_freed_memory` gives
glibc's defaults back).

`keep_freed_memory()` tells glibc (through `mallopt`, before JAX starts its threads) to serve
every thread from one arena (a thread's own arena serves such a block by `mmap` whatever the
mmap limit says), never to `mmap` and never to trim the heap: the block is faulted in once and
reused. The cost is that the process keeps its peak heap, which a training process reaches
again on its next step anyway (a server would keep its model loading's peak for small steps,
so `serve` does not call this). Hosts with an accelerator keep glibc's defaults: their
steps' buffers live in device memory, and their host threads (input pipelines, transfers) are
better served by glibc's many arenas.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Device nodes of the accelerators JAX drives: NVIDIA, AMD (ROCm), TPU (v2 to v5e as accel,
# later generations through VFIO).
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def cpu_only_host() -> bool:
  """True when JAX will compute on the CPU: `JAX_PLATFORMS=cpu`, or no accelerator device node
  on the host (decided without starting JAX, whose threads would already hold their arenas)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring) on a CPU-only glibc
  host; returns whether it did. Call it before JAX's backend starts: threads that already
  allocated keep their own arenas."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not cpu_only_host():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  # mallopt returns 1 on success; the trim threshold is a C int, so at most 2^31 - 1 bytes.
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
