"""Which model weights get quantized, how each is laid out, and the spec that records it.

Params paths are '/'-joined keys of the params dict (`blocks/attn/q`, `blocks/mlp/down`,
`moe_blocks/moe/gate`, `lm_head`, ...). The block weights carry a leading `[L]` layer axis and
expert weights also an `[E]` expert axis (batch axes to QTensor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import jax
import numpy as np

from jaxllm.quant import tensor as qtensor

# path -> (contracted leading axes, batch axes: the stacked layers, and the experts of MoE
# layers' `[Lm, E, ...]` expert weights). Routers and gates stay in float (tiny, and routing
# decisions are sensitive to them).
LAYOUTS = {
    **{f"{stack}/attn/{n}": (1, 1) for stack in ("blocks", "moe_blocks") for n in "qkv"},
    "blocks/attn/o": (2, 1), "moe_blocks/attn/o": (2, 1),
    **{f"blocks/mlp/{n}": (1, 1) for n in ("gate", "up", "down")},
    **{f"moe_blocks/moe/{n}": (1, 2) for n in ("gate", "up", "down")},
    **{f"moe_blocks/moe/shared/{n}": (1, 1) for n in ("gate", "up", "down")},
    "lm_head": (1, 0),
}
# The embedding is a table lookup (and the tied head); like the untied head it stays in full
# precision unless asked (the usual practice: they hold the rarest tokens' only signal).
DEFAULT_EXCLUDE = ("lm_head",)
SPEC_FILE = "quant.json"
METHODS = ("rtn", "gptq", "awq")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a checkpoint's weights were quantized (written beside it as quant.json)."""
  bits: int = 8
  group_size: int = 0  # 0: per output channel
  symmetric: bool = True
  method: str = "rtn"
  clip_search: bool = False  # shrink each group's range to its least squared rounding error
  exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # regexes over params paths
  quantized: tuple[str, ...] = ()  # filled in by quantize_params

  def __post_init__(self):
    if self.bits not in qtensor.BITS:
      raise ValueError(f"bits={self.bits} must be one of {qtensor.BITS}")
    if self.group_size < 0 or (self.bits == 4 and self.group_size % 2):
      raise ValueError(f"group_size={self.group_size} must be 0 (per channel) or a positive "
                       "(for int4: even) number of rows")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} must be one of {METHODS}")
    for pattern in self.exclude:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"exclude pattern {pattern!r}: {e}") from None

  def wants(self, path: str) -> bool:
    return path in LAYOUTS and not any(re.fullmatch(p, path) or re.search(p, path)
                                       for p in self.exclude)

  def save(self, directory: str) -> None:
    with open(os.path.join(directory, SPEC_FILE), "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=2)

  @classmethod
  def load(cls, directory: str) -> QuantSpec | None:
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      raw = json.load(f)
    raw["exclude"], raw["quantized"] = tuple(raw["exclude"]), tuple(raw["quantized"])
    return cls(**raw)


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
  out = {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: dict[str, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def quantize_params(params: dict, spec: QuantSpec,
                    quantize_fn: Callable[[str, jax.Array, int, int], qtensor.QTensor] | None = None
                    ) -> tuple[dict, QuantSpec]:
  """Replaces every weight the spec wants by a QTensor (round-to-nearest unless `quantize_fn`
  (path, weight, in_axes, batch_axes) -> QTensor is given). Returns (params, completed spec)."""
  flat = flatten(params)
  done = []
  for path, w in flat.items():
    if not spec.wants(path):
      continue
    in_axes, batch_axes = LAYOUTS[path]
    if quantize_fn is None:
      flat[path] = qtensor.quantize(w, bits=spec.bits, group_size=spec.group_size,
                                    symmetric=spec.symmetric, in_axes=in_axes,
                                    batch_axes=batch_axes, clip_search=spec.clip_search)
    else:
      flat[path] = quantize_fn(path, w, in_axes, batch_axes)
    done.append(path)
  if not done:
    raise ValueError(f"nothing to quantize: every weight is excluded by {spec.exclude}")
  return unflatten(flat), dataclasses.replace(spec, quantized=tuple(done))


def to_storage(params: dict) -> dict:
  """QTensors -> plain dicts of arrays (what orbax saves)."""
  def convert(x):
    if not qtensor.is_qtensor(x):
      return x
    stored = {"values": x.values, "scales": x.scales}
    if x.zeros is not None:
      stored["zeros"] = x.zeros
    return stored
  return jax.tree.map(convert, params, is_leaf=qtensor.is_qtensor)


def abstract_storage(abstract_params: dict, spec: QuantSpec) -> dict:
  """The stored structure (ShapeDtypeStructs) of a quantized checkpoint of this model."""
  flat = flatten(abstract_params)
  for path in spec.quantized:
    in_axes, batch_axes = LAYOUTS[path]
    fake = jax.eval_shape(lambda w, i=in_axes, b=batch_axes: to_storage({"w": qtensor.quantize(
        w, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, in_axes=i,
        batch_axes=b)})["w"], flat[path])
    flat[path] = fake
  return unflatten(flat)


def from_storage(stored: dict, abstract_params: dict, spec: QuantSpec) -> dict:
  """Plain stored dicts -> QTensors (the inverse of `to_storage`)."""
  flat = flatten(stored)
  shapes = flatten(abstract_params)
  out = {p: v for p, v in flat.items()
         if not any(p.startswith(q + "/") for q in spec.quantized)}
  for path in spec.quantized:
    in_axes, batch_axes = LAYOUTS[path]
    shape = tuple(shapes[path].shape[batch_axes:])
    values = flat[f"{path}/values"]
    rows = int(np.prod(shape[:in_axes]))
    stored_rows = values.shape[-2] * (2 if spec.bits == 4 else 1)
    groups = flat[f"{path}/scales"].shape[-2]
    out[path] = qtensor.QTensor(values, flat[f"{path}/scales"], flat.get(f"{path}/zeros"),
                                spec.bits, stored_rows // groups if groups else rows, shape,
                                in_axes)
  return unflatten(out)
