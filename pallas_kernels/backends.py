"""Which Pallas lowering to use, and how to run it on a machine without that accelerator."""

from __future__ import annotations

import jax

BACKENDS = ("gpu", "tpu")


def resolve(backend: str | None, interpret: bool) -> str:
  """The lowering to use: `backend` if given, else the default device's platform.

  On a CPU-only machine the kernels exist only in the Pallas interpreter: `interpret=True` picks
  the GPU (Triton) lowering unless `backend="tpu"` asks for TPU semantics.
  """
  platform = jax.default_backend()
  if backend is None:
    backend = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform)
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
  return resolve(None, True) == backend and jax.default_backend() != "cpu"


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
