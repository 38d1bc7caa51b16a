"""Which Pallas lowering to use, and how to run it on a machine without that accelerator."""

from __future__ import annotations

import jax

BACKENDS = ("gpu", "tpu")


def target_platform() -> str:
  """The platform the code being traced will run on: "cpu", "gpu" or "tpu".

  The devices of the mesh in context when there is one, else JAX's default backend. The two
  differ when compiling ahead of time for devices this host does not have (a TPU topology on a
  CPU host, `jaxllm.planner.aot`; `lower_for` below): the traced code must pick the target's
  kernels, not the host's.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = jax.default_backend() if device is None else device.platform
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def resolve(backend: str | None, interpret: bool) -> str:
  """The lowering to use: `backend` if given, else the target platform's (`target_platform`).

  On a CPU-only machine the kernels exist only in the Pallas interpreter: `interpret=True` picks
  the GPU (Triton) lowering unless `backend="tpu"` asks for TPU semantics.
  """
  platform = target_platform()
  if backend is None:
    backend = {"gpu": "gpu", "tpu": "tpu"}.get(platform)
    if backend is None:
      if not interpret:
        raise ValueError(f"no Pallas lowering runs natively on {platform!r}: pass interpret=True "
                         "(and backend='gpu' or 'tpu') to run a lowering in the interpreter")
      backend = "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  return backend


def runs_natively(backend: str) -> bool:
  """Whether the default device compiles this lowering (a GPU for "gpu", a TPU for "tpu");
  elsewhere it runs only in the Pallas interpreter."""
  return resolve(None, True) == backend and target_platform() != "cpu"


def tpu_interpret_params():
  """TPU semantics (VMEM/SMEM, grid order, DMA) emulated on CPU."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams()


# Device kinds the lowerings are checked against ahead of time (see `lower_for`).
AOT_DEVICE_KINDS = {"gpu": ("NVIDIA H100", None, "cuda"), "tpu": ("TPU v5p", 1, "tpu")}


def lower_for(backend: str, fn, *args):
  """Lowers `jax.jit(fn)(*args)` for a GPU or TPU that this machine need not have.

  Runs the whole Pallas lowering (Triton IR or Mosaic MLIR, with their block-shape and op
  checks) against an abstract device; only the final vendor compile is left to the hardware.
  `args` may be `jax.ShapeDtypeStruct`s. Returns the lowered StableHLO text.
  """
  kind, cores, platform = AOT_DEVICE_KINDS[backend]
  mesh = jax.sharding.AbstractMesh(
      (1,), ("aot",), abstract_device=jax.sharding.AbstractDevice(kind, cores, platform))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def libtpu_available() -> bool:
  """Whether libtpu is installed, so `compile_for_tpu` can run the real TPU compiler here."""
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def tpu_topology_devices(topology: str, num_slices: int = 1, **kwargs) -> list:
  """Abstract devices of a TPU `topology` ("v5p:2x2x1") described by libtpu, no TPU needed;
  `kwargs` go to `jax.experimental.topologies.get_topology_desc`."""
  import os
  from jax.experimental import topologies
  # libtpu takes a machine-wide lock unless told otherwise; compiling needs no exclusive chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                           num_slices=num_slices, **kwargs).devices)


def compile_for_tpu(fn, *args, topology: str = "v5p:2x2x1") -> str:
  """Compiles `jax.jit(fn)(*args)` with libtpu's compiler for one chip of an abstract TPU
  `topology`: unlike `lower_for`, Mosaic's own compilation (tiling, VMEM budget) runs too. No
  TPU needed, libtpu is (`libtpu_available`). `args` are `jax.ShapeDtypeStruct`s. Returns the
  compiled HLO text."""
  device = tpu_topology_devices(topology)[0]
  mesh = jax.sharding.Mesh([device], ("aot",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  with jax.set_mesh(mesh):  # Mosaic reads the target chip from the mesh in context
    return jax.jit(fn).lower(*args).compile().as_text()
