"""Several LoRA adapters on one base model, served in one batch (multi-LoRA).

`build` stacks the adapters of each target weight into a `LoraBank`: slot 0 holds zeros (the
base alone), slot i the i-th adapter, ranks padded to the largest and each scale folded into
its `b`. Inside a jitted step `select(params, adapter_ids_B)` turns every bank into a
`RowLoraWeight` holding each row's own adapter, so one pass serves a batch that mixes
adapters, and each row's tokens are those it gets served alone. The base weights are shared:
n adapters cost n adapters' bytes, not n models.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.lora import adapters
from jaxllm.lora.weight import LoraBank, is_bank, is_lora
from jaxllm.quant import params as qparams


def build(base_params: dict, adapted: Sequence[dict]) -> dict:
  """`base_params` (no adapters) with a LoraBank at every path any of `adapted` adapts; each
  of `adapted` is `base_params` with one adapter's LoraWeights (`peft_format.load`), and
  becomes slot i + 1."""
  if not adapted:
    raise ValueError("a bank needs at least one adapter")
  flat = qparams.flatten(base_params)
  flats = [qparams.flatten(p) for p in adapted]
  paths = sorted({p for f in flats for p, w in f.items() if is_lora(w)})
  rank = max(w.rank for f in flats for w in f.values() if is_lora(w))
  for path in paths:
    in_axes, lead, fan_in, fan_out = adapters.dims(path, flat[path])
    n = len(adapted) + 1
    a = np.zeros((*lead, n, *fan_in, rank), np.float32)
    b = np.zeros((*lead, n, rank, *fan_out), np.float32)
    keep = (slice(None),) * len(lead)
    for i, f in enumerate(flats, 1):
      w = f.get(path)
      if is_lora(w):
        a[keep + (i, Ellipsis, slice(0, w.rank))] = np.asarray(w.a, np.float32)
        b[keep + (i, slice(0, w.rank))] = np.asarray(w.b, np.float32) * w.scale
    flat[path] = LoraBank(flat[path], jnp.asarray(a), jnp.asarray(b), in_axes)
  return qparams.unflatten(flat)


def load(directories: Sequence[str | os.PathLike[str]], params: dict, cfg) -> dict:
  """`params` with the adapter directories (PEFT's format) as a bank, slot i + 1 for
  `directories[i]`; an adapter that does not fit is refused in one line (AdapterError)."""
  from jaxllm.lora import peft_format
  return build(params, [peft_format.load(os.fspath(d), params, cfg) for d in directories])


def size(params: dict) -> int:
  """Adapter slots of the banks in `params` (slot 0, the base, counted); 1 without banks."""
  for w in jax.tree.leaves(params, is_leaf=is_bank):
    if is_bank(w):
      return w.size
  return 1


def select(params: dict, adapter_ids_B: jax.Array | None) -> dict:
  """`params` with every bank holding adapter `adapter_ids_B[i]` for row i (None: as they
  are). Traced inside the step: picking adapters changes no shape, so nothing recompiles."""
  if adapter_ids_B is None:
    return params
  return jax.tree.map(lambda w: w.rows(adapter_ids_B) if is_bank(w) else w, params,
                      is_leaf=is_bank)
