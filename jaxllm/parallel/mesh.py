"""Device mesh from the `mesh.*` config keys, and multi-host start-up."""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

from jaxllm.config import MeshConfig, resolve_mesh_shape

# Outermost to innermost (jax.make_mesh gives the last axes the closest devices): pipeline stages
# across hosts/slices, tensor parallelism inside a host or ICI ring. XLA also wants the manual
# axes of nested shard_maps (the pipeline's stage, then the kernels' batch and head axes) in
# mesh order, so `stage` must come first.
AXES = ("stage", "data", "fsdp", "expert", "tensor")


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A mesh over all (or the given) devices with axes data, fsdp, tensor, stage, expert.

  Axes are `Auto` (GSPMD propagation from the shardings we place on params and batches), so the
  same code behaves alike on jax versions whose default axis type differs.
  """
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def under_mesh(fn, mesh: Mesh):
  """`fn` called with `mesh` in context, so `rules.constrain` in the model (traced on the first
  call of a jitted `fn`) can place activations on it."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process JAX system; no-op for a single process.

  With no flags on a Cloud TPU VM, `jax.distributed.initialize()` discovers the pod itself; on
  CPU, gloo collectives make several local processes one system (tests use this).
  """
  if coordinator_address is None and num_processes is None:
    return
  # Only the CPU backend reads this; it must be set before the backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
