"""ZeRO stages 1 and 2 over the `data` axis, beside FSDP (stage 3, the `fsdp` axis).

Data-parallel replicas hold the same parameters; without ZeRO each also holds the whole Adam
state for them. Stage 1 splits every optimizer moment over `data` (on top of whatever split its
parameter has from fsdp, tensor or stage), so each replica updates only its slice and the
parameters are re-assembled by an all-gather of the updates. Stage 2 also splits the gradients:
they are constrained to the moments' layout as soon as they exist, so XLA reduces them with a
reduce-scatter instead of an all-reduce and the accumulated gradient (`train.grad_accum`)
takes 1/N of the memory. Parameters keep their own layout in both stages.

With `train.offload_optimizer` the optimizer state (in whichever of these layouts) lives in
host memory and the step brings it to the device for the update and sends it back; XLA's
scheduler moves it leaf by leaf, so only part of it is on the device at a time (GPU/TPU only).

Everything here is placement: the arithmetic of the step is unchanged, so a ZeRO run trains as
one device does (tests/test_parallel.py).
"""

from __future__ import annotations

from typing import Mapping

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

AXIS = "data"
HOST_MEMORY = "pinned_host"
DEVICE_MEMORY = "device"


def shard_over_data(spec: PartitionSpec, shape: tuple[int, ...],
                    mesh_shape: Mapping[str, int]) -> PartitionSpec:
  """`spec` with the data axis added to one dimension of an array of `shape`: the largest
  unsplit dimension it divides, else the largest split one whose shard it still divides.
  Unchanged when the data axis is 1, already used, or divides no dimension (small leaves stay
  replicated)."""
  n = mesh_shape.get(AXIS, 1)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in ((e,) if isinstance(e, str) else (e or ()))}
  if n == 1 or AXIS in used:
    return spec

  def split(e) -> int:
    size = 1
    for a in ((e,) if isinstance(e, str) else (e or ())):
      size *= mesh_shape[a]
    return size

  candidates = [(entries[i] is not None, -shape[i], i) for i in range(len(shape))
                if shape[i] % (split(entries[i]) * n) == 0]
  if not candidates:
    return spec
  _, _, i = min(candidates)
  e = entries[i]
  entries[i] = AXIS if e is None else ((e,) if isinstance(e, str) else tuple(e)) + (AXIS,)
  return PartitionSpec(*entries)


def optimizer_specs(optimizer: optax.GradientTransformation, abstract_opt_state, param_specs,
                    mesh_shape: Mapping[str, int], zero_stage: int):
  """PartitionSpecs of the optimizer state: each moment takes its parameter's spec (so FSDP
  and tensor parallelism split it alike), split over `data` too from ZeRO stage 1; counters
  and other non-parameter leaves are replicated."""
  def moment(leaf, spec):
    return shard_over_data(spec, leaf.shape, mesh_shape) if zero_stage >= 1 else spec
  return optax.tree_map_params(optimizer, moment, abstract_opt_state, param_specs,
                               transform_non_params=lambda _: PartitionSpec(),
                               is_leaf=lambda s: isinstance(s, PartitionSpec))


def state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, param_shardings,
                    mesh, zero_stage: int, offload: bool = False):
  """NamedShardings of the optimizer state on `mesh` (`optimizer_specs`), in host memory
  (`pinned_host`) when `offload`."""
  specs = optimizer_specs(optimizer, abstract_opt_state,
                          jax.tree.map(lambda s: s.spec, param_shardings), dict(mesh.shape),
                          zero_stage)
  kind = {"memory_kind": HOST_MEMORY} if offload else {}
  return jax.tree.map(lambda s: NamedSharding(mesh, s, **kind), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def on_device(shardings):
  """The same shardings in the accelerator's own memory (where an offloaded optimizer state
  is brought for the update)."""
  return jax.tree.map(lambda s: s.with_memory_kind(DEVICE_MEMORY), shardings)


def gradient_specs(abstract_params, param_specs, mesh_shape: Mapping[str, int],
                   zero_stage: int):
  """PartitionSpecs of the gradients: their parameter's below stage 2, the moments' layout
  (split over `data` too) from stage 2."""
  if zero_stage < 2:
    return param_specs
  return jax.tree.map(lambda x, s: shard_over_data(s, x.shape, mesh_shape), abstract_params,
                      param_specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def gradient_shardings(abstract_params, param_shardings, mesh, zero_stage: int):
  """Where stage 2 keeps the gradients (`gradient_specs` on `mesh`); None below stage 2
  (gradients then take their parameter's layout)."""
  if zero_stage < 2:
    return None
  specs = gradient_specs(abstract_params, jax.tree.map(lambda s: s.spec, param_shardings),
                         dict(mesh.shape), zero_stage)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))
