"""Ahead-of-time compilation for Cloud TPU topologies this host does not have.

With `libtpu` installed, `jax.experimental.topologies.get_topology_desc` describes the chips of
any TPU slice (or several slices) as abstract devices, and `jit(...).lower(...).compile()` runs
the real TPU compiler on them from a CPU-only host: sharding, collectives, remat, the Mosaic
kernels and the compiler's own memory analysis, everything but running. `python -m jaxllm.plan
--aot` uses it to tell, before a pod is booked, whether a preset's train step compiles and fits
in each chip's HBM.

A target is a Cloud TPU accelerator type, `v5p-64`, `v6e-256`, `v5e-16`, `v4-32` (v4/v5p count
TensorCores, two per chip; v5e/v6e count chips), split into `mesh.slices` equal slices joined over
the data-centre network (multi-slice). Pairs that compile here: python 3.12 + jax 0.12.0.1 +
libtpu 0.0.51, python 3.11 + jax 0.10.2 + libtpu 0.0.42.1 (`pip install 'jaxllm[tpu]'` picks
the libtpu its jax pins).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm.config import ConfigError
from pallas_kernels import backends

# generation -> (accelerator-type units per chip, HBM per chip in GiB from the Cloud TPU data
# sheets, slice shapes by chip count as Cloud TPU builds them)
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_GENERATIONS = {"v4": (2, 32, _TORUS_3D), "v5p": (2, 95, _TORUS_3D),
                "v5e": (1, 16, _TORUS_2D), "v6e": (1, 32, _TORUS_2D)}


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice (or `slices` equal slices) to compile for."""
  name: str  # the accelerator type, "v5p-64"
  generation: str  # "v5p"
  chips: int  # over all slices
  slices: int
  slice_topology: str  # one slice's chip grid, "2x4x4"
  hbm_bytes: int  # per chip

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:{self.slice_topology}"


def tpu_target(name: str, slices: int = 1) -> Target:
  """The `Target` of an accelerator type such as "v5p-64"; ConfigError when there is none."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not m:
    raise ConfigError(f"{name!r} is not a TPU accelerator type (v4-N, v5p-N, v5e-N, v6e-N)")
  generation = "v5e" if m.group(1) == "v5litepod" else m.group(1)
  per_chip, hbm_gib, shapes = _GENERATIONS[generation]
  units = int(m.group(2))
  if units % per_chip or (units // per_chip) % slices:
    raise ConfigError(f"{name} ({units // per_chip} chips) does not split into {slices} slices")
  chips = units // per_chip
  shape = shapes.get(chips // slices)
  if shape is None:
    raise ConfigError(f"no {generation} slice of {chips // slices} chips (slices of "
                      f"{', '.join(str(n) for n in shapes)} chips)")
  return Target(name, generation, chips, slices, shape, hbm_gib * 2**30)


def preset_of(config_path: str) -> str | None:
  """The preset argument of `--config=FILE:PRESET` ("v5p-64"), or None."""
  _, sep, arg = config_path.rpartition(":")
  return arg if sep and arg else None


def topology_devices(target: Target) -> list:
  """Abstract devices of the target's chips (libtpu's compiler, no TPU needed)."""
  dims = [int(d) for d in target.slice_topology.split("x")] + [1]
  kwargs = {}
  if dims[0] < 2 or dims[1] < 2:  # smaller than libtpu's default host (2x2x1 chips)
    kwargs["chips_per_host_bounds"] = (min(dims[0], 2), min(dims[1], 2), 1)
  try:
    return backends.tpu_topology_devices(target.topology_name, target.slices, **kwargs)
  except Exception as e:  # libtpu missing, or too old for this generation
    raise ConfigError(f"cannot describe TPU topology {target.topology_name} x{target.slices} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      "compiling for TPU needs libtpu: pip install 'jaxllm[tpu]'") from None


def analysis(compiled, seconds: float) -> dict:
  """A compiled program's per-device memory (bytes: arguments, outputs, aliases, temporaries,
  code, and their peak sum), FLOPs and `seconds` (its compile time)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older jax
  out = {"compile_seconds": seconds, "flops": float((cost or {}).get("flops", 0.0))}
  if memory is not None:
    out.update(argument_bytes=memory.argument_size_in_bytes,
               output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
               alias_bytes=memory.alias_size_in_bytes,
               code_bytes=memory.generated_code_size_in_bytes,
               # host memory (offloaded optimizer state and activations)
               host_argument_bytes=getattr(memory, "host_argument_size_in_bytes", 0),
               host_temp_bytes=getattr(memory, "host_temp_size_in_bytes", 0))
    # Live at once: inputs, outputs not written in place of a donated input, scratch, code.
    out["peak_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                         + memory.generated_code_size_in_bytes)
  return out


def _dump(compiled, dump_hlo: str | None, name: str) -> None:
  if dump_hlo:
    os.makedirs(dump_hlo, exist_ok=True)
    with open(os.path.join(dump_hlo, f"{name}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())


def compiled_train_step(cfg: config_lib.Config, devices):
  """The real train step (model, optimizer, shardings, remat, pipeline, kernels) of `cfg`
  compiled for `devices` from abstract inputs, allocating nothing: (the compiled executable,
  compile seconds)."""
  from jaxllm.parallel import mesh as mesh_lib
  from jaxllm.parallel import rules
  from jaxllm.train import loop
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  graphdef, abstract_state, shardings, optimizer = loop.state_shardings(cfg, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, shardings)
  batch_sh = rules.batch_sharding(mesh)
  B, T = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((B, T), dt, sharding=batch_sh) for k, dt in (
      ("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32),
      ("segment_ids", jnp.int32), ("positions", jnp.int32))}
  step = loop.jit_train_step(cfg, graphdef, optimizer, shardings, batch_sh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def compile_train_step(cfg: config_lib.Config, devices, *, dump_hlo: str | None = None) -> dict:
  """`compiled_train_step`'s per-device memory analysis (bytes), FLOP count and compile time.
  `dump_hlo`: also write the optimised HLO there."""
  compiled, seconds = compiled_train_step(cfg, devices)
  _dump(compiled, dump_hlo, "train_step")
  return analysis(compiled, seconds)


def compile_for_tpu(cfg: config_lib.Config, target: Target, *,
                    dump_hlo: str | None = None) -> dict:
  """`compile_train_step` on the target's chips, checked before compiling like a real launch,
  with the chip's HBM and whether the step fits in it."""
  config_lib.validate_for_devices(cfg, target.chips, "tpu")
  devices = topology_devices(target)
  info = dict(target=target.name, topology=target.topology_name, slices=target.slices,
              chips=target.chips, device_kind=devices[0].device_kind, hbm_bytes=target.hbm_bytes)
  try:
    result = compile_train_step(cfg, devices, dump_hlo=dump_hlo)
  except Exception as e:  # jax.errors.JaxRuntimeError, whose home moved between versions
    refusal = _out_of_memory(e)
    if refusal is None:
      raise
    return {**info, "fits": False, "compiler_error": refusal}
  result.update(info)
  result["fits"] = result.get("peak_bytes", 0) <= target.hbm_bytes
  return result


def compile_serving(cfg: config_lib.Config, target: Target, *, batch: int = 8,
                    max_len: int | None = None, page_size: int = 16, prefill_chunk: int = 512,
                    dump_hlo: str | None = None, mesh: str | None = None) -> dict:
  """The inference programs compiled for the target's chips: a prefill chunk
  (`generate.extend_chunk`, `[batch, prefill_chunk]` tokens) and a decode step
  (`generate.decode_step`), over a paged cache of `batch` sequences of `max_len` tokens (default
  the model's), weights and cache in the compute dtype, paged attention through our Mosaic
  kernel. On one chip, or split over `mesh` ("tensor=8", `jaxllm.parallel.placement`: its first
  chips, KV heads replicated as serving does). Returns each program's analysis, the weight and
  cache bytes per chip, and whether the larger program fits a chip's HBM."""
  import math

  import numpy as np

  from jaxllm.inference import generate, paging
  from jaxllm.model import cache as kv_cache
  from jaxllm.model import transformer
  from jaxllm.parallel import placement
  sizes = placement.mesh_sizes(mesh) if mesh else {}
  chips = math.prod(sizes.values()) if sizes else 1
  if chips > target.chips:
    raise ConfigError(f"--serve_mesh={mesh} needs {chips} chips, {target.name} has "
                      f"{target.chips}")
  serving = placement.serving_mesh(devices=topology_devices(target)[:chips], **sizes)
  placement.check_model(cfg.model, serving)
  m = dataclasses.replace(cfg.model, n_kv_heads=placement.kv_heads_for(cfg.model, serving))
  max_len = max_len or m.max_seq_len
  device = serving.devices.flat[0]
  whole = jax.sharding.NamedSharding(serving, jax.sharding.PartitionSpec())
  dtype = jnp.dtype(m.dtype)

  def per_chip(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))

  graphdef, params = transformer.abstract_params(m)
  shardings = placement.param_shardings(params, transformer.logical_axes(m), serving)
  params = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(
          x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=sh),
      params, shardings)
  per_seq = paging.pages_for(max_len, page_size)
  cache = jax.eval_shape(lambda: kv_cache.init_paged_cache(
      m.n_layers, batch * per_seq, page_size, m.n_kv_heads, m.head_dim,
      np.zeros((batch, per_seq), np.int32), dtype=dtype))
  pools = {"k": cache.k, "v": cache.v}
  cache = cache._replace(**{
      name: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                 sharding=placement.cache_sharding(serving, x.shape, paged=True))
      for name, x in pools.items()},
      page_table=jax.ShapeDtypeStruct(cache.page_table.shape, jnp.int32, sharding=whole),
      lengths=jax.ShapeDtypeStruct(cache.lengths.shape, jnp.int32, sharding=whole))

  def ints(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole)

  logits = jax.ShapeDtypeStruct((batch, m.vocab_size), jnp.float32, sharding=whole)
  programs = {"prefill": (generate.extend_chunk, (graphdef, params, ints(batch, prefill_chunk),
                                                  cache, ints(batch), logits)),
              "decode": (generate.decode_step, (graphdef, params, ints(batch), cache))}
  result = {"target": target.name, "device_kind": device.device_kind,
            "hbm_bytes": target.hbm_bytes, "batch": batch, "max_len": max_len,
            "page_size": page_size, "prefill_chunk": prefill_chunk, "mesh": mesh or "one chip",
            "chips": chips, "kv_heads": m.n_kv_heads,
            "weight_bytes": per_chip(params), "cache_bytes": per_chip(cache)}
  with jax.set_mesh(serving):
    for name, (fn, args) in programs.items():
      start = time.perf_counter()
      try:
        compiled = fn.lower(*args).compile()
      except Exception as e:  # jax.errors.JaxRuntimeError, whose home moved between versions
        refusal = _out_of_memory(e)
        if refusal is None:
          raise
        result[name] = {"compiler_error": refusal}
        result["fits"] = False
        return result
      result[name] = analysis(compiled, time.perf_counter() - start)
      result[name]["kernels"] = compiled.as_text().count("tpu_custom_call")
      _dump(compiled, dump_hlo, name)
  result["fits"] = max(result[n]["peak_bytes"] for n in programs) <= target.hbm_bytes
  return result


def _out_of_memory(error: Exception) -> str | None:
  """The TPU compiler's one-line refusal of a program that cannot fit (None for other
  errors): its message has the figures."""
  if "RESOURCE_EXHAUSTED" not in str(error):
    return None
  lines = [line for line in str(error).splitlines() if "memory" in line.lower()]
  return (lines or str(error).splitlines())[0].split(": ", 1)[-1].strip()
