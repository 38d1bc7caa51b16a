"""Device mesh from the `mesh.*` config keys, and multi-host start-up."""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxllm.config import ConfigError, MeshConfig, resolve_mesh_shape

# Outermost to innermost (jax.make_mesh gives the last axes the closest devices): pipeline stages
# across hosts/slices, tensor parallelism inside a host or ICI ring. XLA also wants the manual
# axes of nested shard_maps (the pipeline's stage, then the kernels' batch and head axes) in
# mesh order, so `stage` must come first.
AXES = ("stage", "data", "fsdp", "expert", "tensor")
# A context-parallel mesh (`mesh.context` > 1) adds `context` next to `tensor`: ring and gather
# traffic of long sequences wants the fast links too.
CONTEXT_AXES = ("stage", "data", "fsdp", "expert", "context", "tensor")


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A mesh over all (or the given) devices with axes data, fsdp, tensor, stage, expert.

  Devices of several TPU slices (multi-slice) get a hybrid mesh: stage, then data, span the
  slices (refused when they cannot), the other axes stay within a slice.

  Axes are `Auto` (GSPMD propagation from the shardings we place on params and batches), so the
  same code behaves alike on jax versions whose default axis type differs.
  """
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  axes = CONTEXT_AXES if "context" in sizes else AXES
  shape = tuple(sizes[a] for a in axes)
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  # Only TPU devices of different slices are apart by the slow network (other platforms may
  # number their hosts as slices).
  slices = (len({getattr(d, "slice_index", 0) for d in devices})
            if devices[0].platform == "tpu" else 1)
  if slices != mesh_cfg.slices:
    raise ConfigError(f"mesh.slices={mesh_cfg.slices}, but the devices form {slices} "
                      f"slice{'s' if slices > 1 else ''}")
  if slices == 1:
    try:
      return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)
    except NotImplementedError:
      # A TPU torus whose axes the mesh axes cannot each take whole (fsdp 8 x expert 8 on a
      # 4x4x4 v5p slice): split physical axes.
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(grid, axes, axis_types=axis_types)
  # Multi-slice TPU: slices talk over the data-centre network, orders of magnitude slower than
  # the chips' own links, so only the axes that communicate least (pipeline stages, then data
  # replicas) may span slices; every other axis stays inside one.
  dcn = dict.fromkeys(axes, 1)
  left = slices
  for axis in ("stage", "data"):
    dcn[axis] = math.gcd(sizes[axis], left)
    left //= dcn[axis]
  if left > 1:
    raise ConfigError(f"the devices span {slices} slices, but mesh.stage x mesh.data = "
                      f"{sizes['stage'] * sizes['data']} is not a multiple of {slices}: only "
                      "the stage and data axes may cross slices")
  ici = tuple(sizes[a] // dcn[a] for a in axes)
  grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in axes), devices,
                                              allow_split_physical_axes=True)
  return Mesh(grid, axes, axis_types=axis_types)


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
