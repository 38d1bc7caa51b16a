"""How many KV pages a server allocates: from a memory budget, not from the worst case.

The worst case (every slot holding a full-length sequence) is what `num_pages` defaulted to, and
for SmolLM2-135M (8 slots x 8,192 tokens, float32) that is 2.8 GiB of pages a laptop never
fills. A budget (`--kv_memory`) sizes the pool instead, as vLLM's `gpu_memory_utilization`
does: bytes ("2GiB"), or on an accelerator a fraction of the device memory left after the
weights ("0.9"). The default is 1 GiB on a CPU and 0.9 on an accelerator, never more than the
worst case and never less than one full-length sequence (the engine needs that much). The
engine preempts and later recomputes a request when pages run out, so a smaller pool costs
throughput under load, not correctness. The budget is the target model's pool; a draft model's
pool (as many pages, of its own size) comes on top.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from jaxllm.config import ModelConfig

CPU_DEFAULT = "1GiB"
ACCELERATOR_DEFAULT = "0.9"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def bytes_per_token(cfg: ModelConfig, cache_dtype: str) -> int:
  """KV bytes one token takes over all layers: K and V, each `[kv_heads, head_dim]`, plus one
  float32 scale per head for int8 pages."""
  per_head = cfg.head_dim * np.dtype(cache_dtype if cache_dtype != "int8" else np.int8).itemsize
  if cache_dtype == "int8":
    per_head += 4
  return 2 * cfg.n_layers * cfg.n_kv_heads * per_head


def parse(spec: str) -> tuple[str, float]:
  """("bytes", n) for "512MiB", "2GiB", "1e9"; ("fraction", f) for "0.9" (0 < f <= 1)."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", spec)
  if not m or m.group(2).lower() not in _UNITS:
    raise ValueError(f"--kv_memory={spec} is not a size (512MiB, 2GiB) or a fraction (0.9)")
  value, unit = float(m.group(1)), m.group(2).lower()
  if not unit and 0 < value <= 1:
    return "fraction", value
  if value <= 0:
    raise ValueError(f"--kv_memory={spec} must be positive")
  return "bytes", value * _UNITS[unit]


def free_device_bytes(devices) -> int | None:
  """The smallest free memory over `devices` (limit less in use), None where the backend does
  not say (CPU)."""
  free = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      return None
    free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return min(free) if free else None


def num_pages(cfg: ModelConfig, cache_dtype: str, *, page_size: int, max_slots: int,
              longest: int, budget: str | None, devices=None) -> tuple[int, str]:
  """(pages, how they were chosen) for a pool of `page_size`-token pages: the `budget`
  (`parse`; None: the default for the platform) divided by a page's bytes, between one
  `longest`-token sequence and `max_slots` of them. A fraction applies to the free memory of
  the devices the pool is split over (their KV heads), so per device."""
  devices = list(devices) if devices is not None else jax.devices()[:1]
  on_cpu = devices[0].platform == "cpu"
  budget = budget or (CPU_DEFAULT if on_cpu else ACCELERATOR_DEFAULT)
  kind, value = parse(budget)
  per_page = bytes_per_token(cfg, cache_dtype) * page_size
  fewest = -(-longest // page_size)
  most = max_slots * fewest
  if kind == "fraction":
    free = free_device_bytes(devices)
    if free is None:
      raise ValueError(f"--kv_memory={budget}: a fraction needs an accelerator's memory "
                       "figures; give a size (e.g. 2GiB) on a CPU")
    # Each device holds its share of the KV heads: the pool's bytes spread over the devices.
    value = value * free * len(devices)
  pages = int(value // per_page)
  if pages < fewest:
    raise ValueError(f"--kv_memory={budget} holds {pages} pages of {page_size} tokens, fewer "
                     f"than one {longest}-token sequence needs ({fewest}); raise it or lower "
                     "--max_seq_len")
  return min(pages, most), f"--kv_memory={budget}"
