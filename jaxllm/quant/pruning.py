"""Prune a whole model: magnitude, Wanda or SparseGPT (`jaxllm.quant.sparsity`), per
`PruneSpec`, optionally with SparseGPT's joint int4/int8 quantization.

Wanda and SparseGPT walk the layers in order with calibration rows (`methods.walk_layers`, the
walk GPTQ uses): each layer is pruned on its inputs as the already pruned layers before it
produce them. Magnitude needs no data. Expert weights are pruned per expert on the tokens
routed to it. The pruned model is an ordinary checkpoint (zeros in the weights); the spec,
written beside it as `sparsity.json`, records the method, the target and each weight's
measured sparsity per layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np

from jaxllm.quant import methods, sparsity
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor

SPEC_FILE = "sparsity.json"
METHODS = ("magnitude", "wanda", "sparsegpt")
# The block matmuls; routers, norms, embeddings and the head are never pruned.
PRUNABLE = tuple(p for p in qparams.LAYOUTS if p not in qparams.HEAD_PATHS)


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  method: str = "sparsegpt"
  sparsity: float = 0.5
  pattern: str = ""  # "N:M" (e.g. "2:4"): N weights kept of every M inputs; overrides sparsity
  exclude: tuple[str, ...] = ()  # regexes over params paths kept dense
  bits: int = 0  # sparsegpt only: 4 or 8 quantizes the kept weights in the same pass
  group_size: int = 128
  damp: float = 0.01
  # Filled in by prune_model: path -> fraction of zeros per layer (and per expert).
  measured: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} must be one of {', '.join(METHODS)}")
    self.target()  # validates sparsity / pattern
    if self.bits not in (0, 4, 8):
      raise ValueError(f"bits={self.bits} must be 0 (no quantization), 4 or 8")
    if self.bits and self.method != "sparsegpt":
      raise ValueError("joint quantization (bits) is SparseGPT's; prune with --method=sparsegpt "
                       "or quantize the pruned checkpoint afterwards")
    for pattern in self.exclude:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"exclude pattern {pattern!r}: {e}") from None

  def target(self) -> sparsity.Target:
    return sparsity.Target.parse(self.sparsity, self.pattern or None)

  def wants(self, path: str) -> bool:
    return path in PRUNABLE and not any(re.search(p, path) for p in self.exclude)

  def quant_spec(self) -> qparams.QuantSpec | None:
    """The QuantSpec of the jointly quantized weights (None without `bits`)."""
    if not self.bits:
      return None
    return qparams.QuantSpec(bits=self.bits, group_size=self.group_size, method="gptq",
                             exclude=("lm_head",), quantized=tuple(self.measured))

  def save(self, directory: str) -> None:
    with open(os.path.join(directory, SPEC_FILE), "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)

  @classmethod
  def load(cls, directory: str) -> "PruneSpec | None":
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      raw = json.load(f)
    return cls(**{**raw, "exclude": tuple(raw["exclude"])})


def zero_fraction(w, path: str) -> list:
  """Fraction of zeros of the stacked weight at `path`, per layer (expert weights: per layer
  and expert)."""
  w = np.asarray(w.dequantize() if isinstance(w, qtensor.QTensor) else w)
  batch = qparams.LAYOUTS[path][1]
  return np.mean(w.reshape(*w.shape[:batch], -1) == 0, axis=-1).round(6).tolist()


def prune_model(graphdef, params: dict, spec: PruneSpec, calib_rows=None, *,
                chunk_rows: int = 8, progress: bool = True) -> tuple[dict, PruneSpec]:
  """-> (params with the chosen block weights pruned, the spec with `measured` filled in)."""
  target = spec.target()
  if spec.method == "magnitude":
    flat = qparams.flatten(params)
    for path in [p for p in flat if spec.wants(p)]:
      flat[path] = jnp.asarray(_magnitude_stacked(np.asarray(flat[path], np.float32), path,
                                                  target))
    out = qparams.unflatten(flat)
  else:
    if calib_rows is None:
      raise ValueError(f"method={spec.method} needs calibration rows")

    def names_of(stack, lp):
      present = set(qparams.flatten(lp))
      names = methods.INPUT_OF if stack == "blocks" else methods.MOE_NAMES
      return [n for n in names if n in present and spec.wants(f"{stack}/{n}")]

    def prune_one(m, h, shape, in_axes):
      if spec.method == "wanda":
        return jnp.asarray(np.where(sparsity.wanda(m, h, target), 0.0, m).reshape(shape),
                           jnp.float32)
      mask, result = sparsity.sparsegpt(m, h, target, damp=spec.damp, bits=spec.bits,
                                        group_size=spec.group_size)
      if not spec.bits:
        return jnp.asarray(result.reshape(shape), jnp.float32)
      q, sc, z = result
      g = qtensor.group_size_for(q.shape[0], spec.group_size)
      return qtensor.from_integers(q, sc, z, bits=spec.bits, group_size=g, shape=shape,
                                   in_axes=in_axes)

    out, _ = methods.walk_layers(
        graphdef, params, calib_rows, names_of,
        lambda lp, names, inputs: methods.map_matrices(lp, names, inputs, prune_one),
        chunk_rows=chunk_rows, progress=progress, desc=spec.method)
  flat = qparams.flatten(out)
  measured = {p: zero_fraction(flat[p], p) for p in sorted(flat) if spec.wants(p)}
  return out, dataclasses.replace(spec, measured=measured)


def _magnitude_stacked(w, path, target):
  """Magnitude pruning of a stacked weight `[L, (E,) ...]`, one matrix at a time."""
  in_axes, batch = qparams.LAYOUTS[path]
  lead = w.shape[:batch]
  mats = w.reshape(-1, *w.shape[batch:])
  out = np.empty_like(mats)
  for i, m in enumerate(mats):
    mm = m.reshape(int(np.prod(m.shape[:in_axes])), -1)
    out[i] = np.where(sparsity.magnitude(mm, target), 0.0, mm).reshape(m.shape)
  return out.reshape(*lead, *w.shape[batch:])
