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
    # `[V, D]`: V batch entries of one `[D]` row each, so a group's scale belongs to one vocab
    # row (per-row int8 when the group is all of D) and a lookup reads only its rows.
    "embed": (1, 1),
}
# The embedding (a table lookup, and the tied head) and the untied head stay in full precision
# unless `head_bits` asks (they hold the rarest tokens' only signal), but they are most of a
# small model's bytes per decoded token: SmolLM2-135M's tied table is 113 MB of its 538.
HEAD_PATHS = ("embed", "lm_head")
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
  # The embedding and head (`HEAD_PATHS`): 0 keeps them in float; 8 or 4 rounds them to nearest
  # with `head_group_size` (0: one scale per vocab row) whatever `method` the blocks take.
  head_bits: int = 0
  head_group_size: int = 0

  def __post_init__(self):
    for name, bits, group, allowed in (("bits", self.bits, self.group_size, qtensor.BITS),
                                       ("head_bits", self.head_bits, self.head_group_size,
                                        (0,) + qtensor.BITS)):
      if bits not in allowed:
        raise ValueError(f"{name}={bits} must be one of {allowed}")
      if group < 0 or (bits == 4 and group % 2):
        raise ValueError(f"{name.replace('bits', 'group_size')}={group} must be 0 (per "
                         "channel) or a positive (for int4: even) number of rows")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} must be one of {METHODS}")
    for pattern in self.exclude:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"exclude pattern {pattern!r}: {e}") from None

  def wants(self, path: str) -> bool:
    if path in HEAD_PATHS and self.head_bits:
      return True
    # The embedding only through head_bits; an untied head also the old way (not excluded:
    # then at the blocks' bits), which checkpoints written before head_bits rely on.
    return path in LAYOUTS and path != "embed" and not any(
        re.fullmatch(p, path) or re.search(p, path) for p in self.exclude)

  def bits_for(self, path: str) -> tuple[int, int]:
    """(bits, group_size) of a quantized weight."""
    if path in HEAD_PATHS and self.head_bits:
      return self.head_bits, self.head_group_size
    return self.bits, self.group_size

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
    unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{path}: unknown keys {sorted(unknown)} (written by a newer jaxllm?)")
    return cls(**raw)


def default_head_group(head_bits: int) -> int:
  """Per vocab row for int8; groups of 32 for int4 (llama.cpp's block size; even so an int4
  table costs SmolLM2-135M 6% of perplexity, docs/quantization.md)."""
  return 32 if head_bits == 4 else 0


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
    bits, group = spec.bits_for(path)
    if quantize_fn is None or path in HEAD_PATHS and spec.head_bits:
      flat[path] = qtensor.quantize(w, bits=bits, group_size=group, symmetric=spec.symmetric,
                                    in_axes=in_axes, batch_axes=batch_axes,
                                    clip_search=spec.clip_search)
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
    bits, group = spec.bits_for(path)
    fake = jax.eval_shape(lambda w, i=in_axes, b=batch_axes: to_storage({"w": qtensor.quantize(
        w, bits=bits, group_size=group, symmetric=spec.symmetric, in_axes=i,
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
    bits, _ = spec.bits_for(path)
    shape = tuple(shapes[path].shape[batch_axes:])
    values = flat[f"{path}/values"]
    rows = int(np.prod(shape[:in_axes]))
    stored_rows = values.shape[-2] * (2 if bits == 4 else 1)
    groups = flat[f"{path}/scales"].shape[-2]
    out[path] = qtensor.QTensor(values, flat[f"{path}/scales"], flat.get(f"{path}/zeros"),
                                bits, stored_rows // groups if groups else rows, shape,
                                in_axes)
  return unflatten(out)
