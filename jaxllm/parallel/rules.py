"""Logical axis names -> mesh axes.

Logical axes (on parameters and activations): batch, length, embed, heads, kv_heads, head_dim,
mlp, vocab, expert, layers, sequence (the residual stream's length under sequence parallelism).
Mesh axes: data, fsdp, tensor, stage, expert.

FSDP shards parameters along `embed` over `fsdp`; tensor parallelism splits heads, kv_heads,
mlp and vocab over `tensor`; expert parallelism splits MoE experts over `expert`. The batch is
split over data x fsdp x expert (outside the MoE layers the expert axis is one more data axis;
inside them tokens travel to their experts' devices by all-to-all). A dimension whose size does
not divide evenly by its mesh axes is replicated instead (e.g. 2 kv heads on tensor=4).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", "stage"),
    ("sequence", ("context", "tensor")),
)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims are named by logical `axes`."""
  table: Mapping[str, str | tuple[str, ...] | None] = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    target = table.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    # A mesh axis may shard only one dim; size-1 axes shard nothing.
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape.get(a, 1) > 1)
    n = 1
    for a in mesh_axes:
      n *= mesh.shape[a]
    if not mesh_axes or size % n:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


# Activations between blocks: batch split like the input batch, everything else whole. (The
# parameter rule embed -> fsdp must not reach activations: XLA would then shard them by
# d_model and run the batch unsplit on every FSDP device.)
ACTIVATION_AXES_BTD = ("batch", "length", None)
ACTIVATION_AXES_BTV = ("batch", "length", "vocab")
# Sequence parallelism (`mesh.sequence_parallel`): between blocks the residual stream is split
# along the sequence over the tensor axis; XLA then all-gathers it into each block's
# tensor-parallel matmuls and reduce-scatters their outputs, in place of one all-reduce.
SEQUENCE_PARALLEL_AXES_BTD = ("batch", "sequence", None)


def constrain(x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """`with_sharding_constraint` of activation `x` by logical `axes` on the mesh in context
  (`jax.set_mesh`); a no-op without one (single device, tests of bare modules)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh, rules))


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of arrays, given a same-structured tree of logical axes."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)),
      axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_axes(mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes (of size > 1, not already manual) that split the batch, outermost first."""
  target = dict(rules)["batch"]
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return tuple(a for a in ((target,) if isinstance(target, str) else target)
               if dict(mesh.shape).get(a, 1) > 1 and a not in manual)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of `[batch, length]` input arrays (length split over `context` when the mesh has
  it)."""
  length = "context" if dict(mesh.shape).get("context", 1) > 1 else None
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules) or None, length))


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows this process's devices hold under `sharding`.

  `jax.make_array_from_process_local_data` expects exactly these rows from each process.
  """
  columns = 1
  for axis in jax.tree.leaves(sharding.spec[1:]):  # a split length axis (context parallelism)
    columns *= sharding.mesh.shape[axis]
  indices = sharding.addressable_devices_indices_map((global_batch, columns)).values()
  # Devices that differ only along non-batch axes hold the same rows: one span each.
  spans = sorted({(rows.start or 0, global_batch if rows.stop is None else rows.stop)
                  for rows, _ in indices})
  if any(stop != next_start for (_, stop), (next_start, _) in zip(spans, spans[1:])):
    raise ValueError(f"this process's batch rows {spans} are not contiguous; order the mesh so "
                     "each process holds one block of the batch")
  return spans[0][0], spans[-1][1]
