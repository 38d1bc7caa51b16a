"""`LoraWeight`: a frozen base weight plus a trainable low-rank update, in the params tree
where the plain weight was.

A projection weight `[*in, *out]` (float or QTensor, `in_axes` leading axes contracted) becomes
`base + scale * a @ b` with a `[*in, r]` and b `[r, *out]`, and `ops.quant_matmul.project`
computes `x @ base + scale * (x @ a) @ b` without forming the sum: for a QTensor base (QLoRA)
the base stays packed, and the update costs `r * (in + out)` multiply-adds a token. Stacked
block weights carry their leading batch axes (`[L]`) on all three parts, so scanning or
indexing the layers slices a LoraWeight like any other leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


class _ReadLikeAWeight:
  """What the model asks of the weight in a param's place: `[...]` (how it reads a param) gives
  the weight itself, and shape and dtype are its base's."""
  base: Any

  def __getitem__(self, key):
    if key is Ellipsis:
      return self
    raise TypeError(f"a {type(self).__name__} supports only [...]")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self):
    return self.base.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight(_ReadLikeAWeight):
  """`base` `[*batch, *in, *out]` (array or QTensor), `a` `[*batch, *in, r]`, `b`
  `[*batch, r, *out]`; the update is `scale * a @ b` (`scale`: alpha / r, or alpha / sqrt(r)
  for rsLoRA). In training with LoRA dropout (`with_dropout`), `dropout_key` `[*batch, 2]`
  drops each input of the adapter's path with probability `dropout` (the base's product sees
  every input, as in PEFT)."""
  base: Any
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  in_axes: int = dataclasses.field(metadata=dict(static=True))
  dropout_key: jax.Array | None = None
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  def __getitem__(self, key):
    if key is Ellipsis:  # how a model reads its weights (`self.q[...]`)
      return self
    raise TypeError("a LoraWeight supports only [...]; merge() it to index")

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """`scale * a @ b` `[*batch, *in, *out]` in `dtype`."""
    lead = self.a.ndim - self.in_axes - 1  # batch axes
    a = self.a.reshape(*self.a.shape[:lead], -1, self.rank).astype(dtype)
    b = self.b.reshape(*self.b.shape[:lead], self.rank, -1).astype(dtype)
    return (self.scale * jnp.matmul(a, b)).reshape(self.shape).astype(dtype)

  def merge(self, dtype=jnp.float32) -> jax.Array:
    """The plain weight `base + scale * a @ b` (a QTensor base dequantized first)."""
    return self.base.astype(dtype) + self.delta(dtype)

  def astype(self, dtype) -> jax.Array:
    return self.merge(dtype)


def is_lora(x) -> bool:
  return isinstance(x, LoraWeight)


def dropped(x: jax.Array, w: LoraWeight) -> jax.Array:
  """x as the adapter's path sees it: with a `dropout_key`, each element zeroed with
  probability `dropout` and the rest scaled by 1 / (1 - dropout); else x."""
  if w.dropout_key is None or w.dropout == 0.0:
    return x
  keep = jax.random.bernoulli(jax.random.wrap_key_data(w.dropout_key), 1.0 - w.dropout, x.shape)
  return jnp.where(keep, x / (1.0 - w.dropout), 0.0).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraBank(_ReadLikeAWeight):
  """Several adapters of one weight, served side by side (`jaxllm.lora.bank`): `base`
  `[*batch, *in, *out]`, `a` `[*batch, n, *in, r]`, `b` `[*batch, n, r, *out]` with each
  adapter's scale folded into its `b` and smaller ranks padded with zeros. Adapter 0 is zeros
  (the base alone). A bank never reaches a product: `rows(ids)` picks each row's adapter."""
  base: Any
  a: jax.Array
  b: jax.Array
  in_axes: int = dataclasses.field(metadata=dict(static=True))

  @property
  def size(self) -> int:
    """Adapters in the bank, the base's zero adapter included."""
    return self.a.shape[self.a.ndim - self.in_axes - 2]

  def rows(self, ids_B: jax.Array) -> RowLoraWeight:
    """The weight with adapter `ids_B[i]` on row i of the batch."""
    lead = self.a.ndim - self.in_axes - 2
    return RowLoraWeight(self.base, jnp.take(self.a, ids_B, axis=lead),
                         jnp.take(self.b, ids_B, axis=lead), self.in_axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowLoraWeight(_ReadLikeAWeight):
  """A base weight with one adapter per row of the batch: `a` `[*batch, B, *in, r]`, `b`
  `[*batch, B, r, *out]` (scale folded into b); row i of x `[B, ..., *in]` gets
  `x_i @ base + (x_i @ a_i) @ b_i` (`ops.quant_matmul.project`)."""
  base: Any
  a: jax.Array
  b: jax.Array
  in_axes: int = dataclasses.field(metadata=dict(static=True))


def is_bank(x) -> bool:
  return isinstance(x, LoraBank)


def is_row_lora(x) -> bool:
  return isinstance(x, RowLoraWeight)
