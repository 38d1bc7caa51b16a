"""`LayerView`: one layer of a stacked `[L, ...]` param, named by index but not yet sliced.

Inference scans the layers by index with the stacks held whole (`Transformer.extend`), and a
layer's params are LayerViews. `quant_matmul.project` hands a view's whole stack and index to
the CPU kernel (`cpu_gemv`), which reads the layer in place: slicing it out first is a copy
that XLA:CPU makes for every layer of every decode step, costing more than the product itself.
Everything else takes the slice (`get()`, or `[...]` then `astype`, as the model reads a
param), which XLA drops again when nothing uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxllm.quant import tensor as qtensor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
  """Layer `index` (int32 `[]`) of `stack`: an array `[L, ...]` or a QTensor over `[L]`."""
  stack: Any
  index: jax.Array

  def __getitem__(self, key):
    if key is Ellipsis:
      return self
    raise TypeError("a LayerView supports only [...]; get() the layer to index it")

  def get(self):
    """The layer itself: an array `[...]`, or a QTensor of one layer."""
    take = lambda a: None if a is None else jax.lax.dynamic_index_in_dim(
        a, self.index, keepdims=False)
    if qtensor.is_qtensor(self.stack):
      return dataclasses.replace(self.stack, values=take(self.stack.values),
                                 scales=take(self.stack.scales), zeros=take(self.stack.zeros))
    return take(self.stack)

  def astype(self, dtype):
    return self.get().astype(dtype)


def views(stacked: dict, index: jax.Array) -> dict:
  """Layer `index` of every stacked param in a params tree, as LayerViews."""
  return jax.tree.map(lambda a: LayerView(a, index), stacked, is_leaf=qtensor.is_qtensor)
