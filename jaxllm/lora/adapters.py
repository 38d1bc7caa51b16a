"""Which weights take LoRA adapters, and adding, merging and splitting them.

Targets name projections of the transformer blocks (`q k v o` attention, `gate up down` the
dense MLP), in the dense stack (`blocks`) and the attention of MoE layers (`moe_blocks`; the
experts themselves are not adapted). Params paths and layouts are the QTensor format's
(`quant.params.LAYOUTS`): a `[L, *in, *out]` stacked weight gets a `[L, *in, r]` and b
`[L, r, *out]`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.lora.weight import LoraWeight, is_lora
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor

# target name -> path under a stack
TARGETS = {"q": "attn/q", "k": "attn/k", "v": "attn/v", "o": "attn/o",
           "gate": "mlp/gate", "up": "mlp/up", "down": "mlp/down"}
STACKS = ("blocks", "moe_blocks")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`targets` (names of TARGETS), `rank` r, `alpha`; the update is scaled by alpha / r, or
  alpha / sqrt(r) with `rslora` (rank-stabilised: the scale keeps the update's size as r
  grows)."""
  targets: tuple[str, ...] = tuple(TARGETS)
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown or not self.targets:
      raise ValueError(f"lora targets {list(self.targets)}: each must be one of "
                       f"{list(TARGETS)} (at least one)")
    if self.rank < 1:
      raise ValueError(f"lora rank={self.rank} must be >= 1")
    if not self.alpha > 0:
      raise ValueError(f"lora alpha={self.alpha} must be > 0")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def full_shape(w) -> tuple[int, ...]:
  """A (possibly stacked) weight's shape, batch axes first, for a QTensor too."""
  if qtensor.is_qtensor(w):
    return tuple(w.values.shape[:-2]) + tuple(w.shape)
  return tuple(w.shape)


def dims(path: str, w) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(in_axes, batch shape, in shape, out shape) of the weight `w` at params path `path`: what
  its adapter's a `[*batch, *in, r]` and b `[*batch, r, *out]` are shaped by."""
  if is_lora(w):
    raise ValueError(f"{path} already has a LoRA adapter")
  in_axes, batch = qparams.LAYOUTS[path]
  shape = full_shape(w)
  return in_axes, shape[:batch], shape[batch:batch + in_axes], shape[batch + in_axes:]


def target_paths(params: dict, cfg: LoraConfig) -> list[str]:
  flat = qparams.flatten(params)
  return [f"{stack}/{TARGETS[t]}" for stack in STACKS for t in cfg.targets
          if f"{stack}/{TARGETS[t]}" in flat]


def add(params: dict, cfg: LoraConfig, seed: int = 0) -> dict:
  """`params` with every target weight a LoraWeight: `a` uniform in +-1/sqrt(fan_in) (PEFT's
  default, Kaiming-uniform with a = sqrt(5)), `b` zeros, so the model starts unchanged."""
  flat = qparams.flatten(params)
  paths = target_paths(params, cfg)
  if not paths:
    raise ValueError(f"lora targets {list(cfg.targets)} match no weight of this model")
  keys = jax.random.split(jax.random.PRNGKey(seed), len(paths))
  for path, key in zip(paths, keys):
    w = flat[path]
    in_axes, lead, fan_in, fan_out = dims(path, w)
    limit = min(math.prod(fan_in), math.prod(fan_out))
    if cfg.rank > limit:
      raise ValueError(f"lora rank={cfg.rank} is larger than {path}'s dimensions "
                       f"{fan_in} -> {fan_out} (at most {limit})")
    bound = 1.0 / math.sqrt(math.prod(fan_in))
    a = jax.random.uniform(key, (*lead, *fan_in, cfg.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, cfg.rank, *fan_out), jnp.float32)
    flat[path] = LoraWeight(w, a, b, cfg.scale, in_axes)
  return qparams.unflatten(flat)


def merge(params: dict) -> dict:
  """Every LoraWeight replaced by its plain weight `base + scale * a @ b`, in the base's dtype
  (float32 for a quantized base)."""
  def one(w):
    if not is_lora(w):
      return w
    dtype = jnp.float32 if qtensor.is_qtensor(w.base) else w.base.dtype
    return w.merge(dtype)
  return jax.tree.map(one, params, is_leaf=is_lora)


def adapters(params: dict) -> dict[str, dict[str, jax.Array]]:
  """`{path: {"a": a, "b": b}}`: the trainable part of `params` (what an optimizer updates
  and an adapter checkpoint stores)."""
  return {path: {"a": w.a, "b": w.b} for path, w in qparams.flatten(params).items()
          if is_lora(w)}


def with_adapters(params: dict, new: dict[str, dict[str, jax.Array]]) -> dict:
  """`params` with the LoraWeights at `new`'s paths holding `new`'s a and b (same shapes)."""
  flat = qparams.flatten(params)
  missing = sorted(set(new) - {p for p, w in flat.items() if is_lora(w)})
  if missing:
    raise ValueError(f"no LoRA adapter at {missing}")
  for path, ab in new.items():
    w = flat[path]
    for name in ("a", "b"):
      if tuple(np.shape(ab[name])) != tuple(getattr(w, name).shape):
        raise ValueError(f"adapter {path}/{name} has shape {tuple(np.shape(ab[name]))}, the "
                         f"model wants {tuple(getattr(w, name).shape)}")
    flat[path] = dataclasses.replace(w, a=ab["a"], b=ab["b"])
  return qparams.unflatten(flat)


def with_dropout(params: dict, key: jax.Array, rate: float) -> dict:
  """`params` with LoRA dropout on every adapter for one training step: each weight (and each
  layer of a stacked one) gets its own key from `key`, so the masks differ between weights,
  layers and steps. `rate` 0: `params` as they are."""
  if rate == 0.0:
    return params
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32 [2] key (TrainState's "rng")
  flat = qparams.flatten(params)
  for i, (path, w) in enumerate(sorted(flat.items())):
    if is_lora(w):
      lead = w.a.shape[:w.a.ndim - w.in_axes - 1]
      keys = jax.random.split(jax.random.fold_in(key, i), max(math.prod(lead), 1))
      flat[path] = dataclasses.replace(
          w, dropout_key=jax.random.key_data(keys).reshape(*lead, -1), dropout=rate)
  return qparams.unflatten(flat)


def config_of(params: dict) -> tuple[int, float] | None:
  """(rank, scale) of the adapters in `params`, or None without any."""
  for w in qparams.flatten(params).values():
    if is_lora(w):
      return w.rank, w.scale
  return None
