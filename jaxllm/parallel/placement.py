"""Where inference state lives on a mesh: parameter shardings (float and quantized), KV-cache
shardings, and the KV-head replication that lets any tensor-parallel degree split the cache.

Inference uses the training rules (`jaxllm.parallel.rules`): heads, kv_heads, mlp and vocab
split over `tensor`, the batch over `data`. A mesh for serving is given as a short string,
`"tensor=4"` or `"data=2,tensor=4"` (`parse_mesh`); unnamed axes are 1, and the mesh takes the
first devices it needs, so replicas can take the others.

KV heads that the tensor axis does not divide (3 KV heads on tensor=2, 2 on tensor=8) are
replicated the way vLLM and JetStream do it: each KV head is repeated until the count is
lcm(K, TP), so every device holds whole KV heads for exactly its query heads
(`replicate_kv_heads`). GQA maps query head h to KV head h // (H / K); with each KV head
repeated r times in place, h // (H / (K r)) lands on a copy of the same head, so every query
head attends exactly the keys and values it did.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxllm.config import ConfigError, MeshConfig, ModelConfig, devices_available
from jaxllm.parallel import rules

# The axes inference may use; pipeline stages do not apply to a KV-cached forward.
SERVING_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axes of the cache arrays: contiguous `[L, B, S, K, Dh]` (rows split like the batch) and
# paged pools `[L, N, P, K, Dh]` (pages are shared by every row, so only the heads split). Int8
# scales drop the last axis.
CONTIGUOUS_CACHE_AXES = (None, "batch", None, "kv_heads", None)
PAGED_CACHE_AXES = (None, None, None, "kv_heads", None)


def parse_mesh(spec: str | None, devices=None) -> Mesh | None:
  """`"data=2,tensor=4"` -> a Mesh over the first 8 devices (None for an empty spec)."""
  if not spec:
    return None
  return serving_mesh(devices=devices, **mesh_sizes(spec))


def replica_meshes(spec: str | None, replicas: int, devices=None) -> list[Mesh]:
  """One mesh of shape `spec` (one device when empty) per replica, on disjoint devices: replica
  i takes devices [i * n, (i + 1) * n)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_sizes(spec) if spec else {}
  n = math.prod(sizes.values()) if sizes else 1
  if replicas < 1 or replicas * n > len(devices):
    raise ConfigError(f"{replicas} replicas of {n} device{'s' if n > 1 else ''} need "
                      f"{replicas * n} devices, {devices_available(len(devices))}")
  return [serving_mesh(devices=devices[i * n:(i + 1) * n], **sizes) for i in range(replicas)]


def mesh_sizes(spec: str) -> dict[str, int]:
  """`"data=2,tensor=4"` -> {"data": 2, "tensor": 4}, with one-line errors."""
  sizes = {}
  for part in spec.split(","):
    name, eq, value = part.strip().partition("=")
    if not eq or name not in SERVING_AXES:
      raise ConfigError(f"--mesh={spec!r}: each part is AXIS=N with AXIS one of "
                        f"{', '.join(SERVING_AXES)}")
    if name in sizes:
      raise ConfigError(f"--mesh={spec!r} names {name} twice")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ConfigError(f"--mesh={spec!r}: {name}={value!r} is not an integer") from None
    if sizes[name] < 1:
      raise ConfigError(f"--mesh={spec!r}: {name} must be >= 1")
  return sizes


def serving_mesh(*, data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
                 devices=None) -> Mesh:
  """A mesh over the first data x fsdp x tensor x expert of `devices` (default: all)."""
  from jaxllm.parallel import mesh as mesh_lib
  devices = jax.devices() if devices is None else list(devices)
  n = data * fsdp * tensor * expert
  if n > len(devices):
    raise ConfigError(f"the mesh data={data} x fsdp={fsdp} x tensor={tensor} x expert={expert} "
                      f"needs {n} devices, {devices_available(len(devices))}")
  return mesh_lib.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert),
                            devices[:n])


def axis_size(mesh: Mesh | None, name: str) -> int:
  return 1 if mesh is None else dict(mesh.shape).get(name, 1)


def check_model(cfg: ModelConfig, mesh: Mesh | None) -> None:
  """One-line refusal of a model the mesh cannot split."""
  tp = axis_size(mesh, "tensor")
  if mesh is not None and axis_size(mesh, "stage") > 1:
    raise ConfigError("inference runs no pipeline: the serving mesh has no stage axis")
  if cfg.n_heads % tp:
    raise ConfigError(f"the model has {cfg.n_heads} query heads, which tensor={tp} does not "
                      "divide; use a tensor size that divides the query heads")


def kv_heads_for(cfg: ModelConfig, mesh: Mesh | None) -> int:
  """How many KV heads the model keeps under this mesh: its own, or lcm(K, TP) copies."""
  tp = axis_size(mesh, "tensor")
  return cfg.n_kv_heads if cfg.n_kv_heads % tp == 0 else math.lcm(cfg.n_kv_heads, tp)


def replicate_kv_heads(params: dict, cfg: ModelConfig, mesh: Mesh | None
                       ) -> tuple[dict, ModelConfig]:
  """(params, config) with each KV head repeated in place until the tensor axis divides them
  (unchanged when it already does). Works on float arrays and quantized (QTensor) weights:
  their columns are the (K, Dh) output features, so repeating column blocks repeats heads."""
  from jaxllm.quant import tensor as qtensor
  K = cfg.n_kv_heads
  K2 = kv_heads_for(cfg, mesh)
  if K2 == K:
    return params, cfg
  r, Dh = K2 // K, cfg.head_dim

  def heads(x, axis):  # [..., K, Dh, ...] at `axis` -> K * r
    return jnp.repeat(x, r, axis=axis)

  def cols(x):  # [..., K * Dh] -> [..., K * r * Dh]
    lead = x.shape[:-1]
    return jnp.repeat(x.reshape(*lead, K, Dh), r, axis=-2).reshape(*lead, K2 * Dh)

  def weight(w):  # [L, D, K, Dh]
    if qtensor.is_qtensor(w):
      return dataclasses.replace(
          w, values=cols(w.values), scales=cols(w.scales),
          zeros=None if w.zeros is None else cols(w.zeros),
          shape=w.shape[:-2] + (K2, Dh))
    return heads(w, -2)

  def stack(blocks):
    attn = dict(blocks["attn"])
    attn["k"], attn["v"] = weight(attn["k"]), weight(attn["v"])
    for b in ("k_bias", "v_bias"):  # [L, K, Dh]
      if b in attn:
        attn[b] = heads(attn[b], -2)
    return {**blocks, "attn": attn}

  out = dict(params)
  for name in ("blocks", "moe_blocks"):
    if name in out:
      out[name] = stack(out[name])
  return out, dataclasses.replace(cfg, n_kv_heads=K2)


def _qtensor_storage_axes(float_axes: tuple, in_axes: int, batch_axes: int, leaf: str
                          ) -> tuple:
  """Logical axes of a stored QTensor leaf (`values` `[*batch, I, O]`, `scales`/`zeros`
  `[*batch, G, O]`): the batch axes, then the first contracted axis for rows (it is the
  outermost, so contiguous row blocks are blocks of it) and the first output axis for columns."""
  batch = tuple(float_axes[:batch_axes])
  rows = float_axes[batch_axes]
  # The embedding `[V, D]` is V batch entries of a `[D]` row: its columns axis is a stored 1.
  out = float_axes[batch_axes + in_axes] if batch_axes + in_axes < len(float_axes) else None
  return batch + ((rows if leaf == "values" else None), out)


def param_shardings(abstract_params: dict, axes: dict, mesh: Mesh,
                    quantized: dict | None = None) -> dict:
  """NamedShardings for a params tree (float arrays, or the stored form of a quantized
  checkpoint: `<path>/values|scales|zeros`), from the float model's logical `axes` tree.

  `quantized` maps a weight's path to its QTensor layout (in_axes, batch_axes), for weights
  that are stored quantized. Group scales stay whole along rows (groups need not line up with
  the row shards); the int values split like the float rows where they divide.
  """
  from jaxllm.quant import params as qparams
  flat_axes = qparams.flatten(axes)
  quantized = quantized or {}

  def one(path, x):
    if path in flat_axes:
      names = flat_axes[path]
    else:
      base, _, leaf = path.rpartition("/")
      in_axes, batch_axes = quantized[base]
      names = _qtensor_storage_axes(flat_axes[base], in_axes, batch_axes, leaf)
    return NamedSharding(mesh, rules.spec_for(names, x.shape, mesh))

  flat = qparams.flatten(abstract_params)
  return qparams.unflatten({p: one(p, x) for p, x in flat.items()})


def lora_axes(float_axes: tuple, w) -> tuple[tuple, tuple]:
  """Logical axes of a LoraWeight's `a` `[*batch, *in, r]` and `b` `[*batch, r, *out]` from
  its weight's `float_axes` (`[*batch, *in, *out]`): each splits like the weight's batch and
  in (a) or out (b) axes; the rank stays whole. A LoraBank's adapter axis (after the batch
  axes) stays whole too."""
  from jaxllm.lora.weight import is_bank
  bank = (None,) if is_bank(w) else ()
  lead = w.a.ndim - w.in_axes - 1 - len(bank)
  batch = tuple(float_axes[:lead])
  return (batch + bank + tuple(float_axes[lead:lead + w.in_axes]) + (None,),
          batch + bank + (None,) + tuple(float_axes[lead + w.in_axes:]))


def qtensor_shardings(params: dict, axes: dict, mesh: Mesh) -> dict:
  """Shardings for an in-memory params tree whose leaves may be QTensors, LoraWeights or
  LoraBanks (same structure: a QTensor's shardings as a QTensor of NamedShardings, a
  LoraWeight's as a LoraWeight of its base's shardings and `lora_axes`')."""
  from jaxllm.lora.weight import is_bank, is_lora
  from jaxllm.quant import params as qparams
  from jaxllm.quant import tensor as qtensor
  flat_params = qparams.flatten(params)
  adapted = lambda w: is_lora(w) or is_bank(w)
  bases = {p: (w.base if adapted(w) else w) for p, w in flat_params.items()}
  stored = qparams.to_storage(qparams.unflatten(bases))
  layouts = {p: (w.in_axes, w.values.ndim - 2)
             for p, w in bases.items() if qtensor.is_qtensor(w)}
  flat = qparams.flatten(param_shardings(stored, axes, mesh, layouts))
  flat_axes = qparams.flatten(axes)
  out = {}
  for path, w in bases.items():
    if qtensor.is_qtensor(w):
      out[path] = dataclasses.replace(w, values=flat[f"{path}/values"],
                                      scales=flat[f"{path}/scales"],
                                      zeros=flat.get(f"{path}/zeros"))
    else:
      out[path] = flat[path]
    lora = flat_params[path]
    if adapted(lora):
      a_axes, b_axes = lora_axes(flat_axes[path], lora)
      out[path] = dataclasses.replace(
          lora, base=out[path],
          a=NamedSharding(mesh, rules.spec_for(a_axes, lora.a.shape, mesh)),
          b=NamedSharding(mesh, rules.spec_for(b_axes, lora.b.shape, mesh)))
  return qparams.unflatten(out)


def place_params(params: dict, cfg: ModelConfig, mesh: Mesh | None, axes: dict, *,
                 kv_head_copies: bool = True) -> tuple[dict, ModelConfig]:
  """(params on the mesh, the config they now implement): KV heads replicated where needed
  (unless `kv_head_copies` is off: tools that write the model back, like quantize, keep its
  own heads, which then stay whole where the tensor axis does not divide them), every leaf
  placed by the logical-axis rules (`axes`, `transformer.logical_axes`); a host array goes
  straight into its shards."""
  if mesh is None:
    return params, cfg
  check_model(cfg, mesh)
  if kv_head_copies:
    params, cfg = replicate_kv_heads(params, cfg, mesh)
  return jax.device_put(params, qtensor_shardings(params, axes, mesh)), cfg


def _cache_spec(shape: tuple[int, ...], mesh, paged: bool):
  """PartitionSpec of one cache array `[L, B|N, S|P, K, Dh]` (or its int8 scales, without Dh)."""
  names = PAGED_CACHE_AXES if paged else CONTIGUOUS_CACHE_AXES
  return rules.spec_for(names[:len(shape)], shape, mesh)


def cache_sharding(mesh: Mesh, shape: tuple[int, ...], paged: bool) -> NamedSharding:
  return NamedSharding(mesh, _cache_spec(shape, mesh, paged))


def constrain_cache(x, paged: bool):
  """`x` (a cache array or `Int8KV`) held to its cache sharding on the mesh in context (no-op
  without one), so a donated cache comes back out of a jitted step exactly where it went in."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
      a, _cache_spec(a.shape, mesh, paged)), x)


def zeros_on(mesh: Mesh | None, shape: tuple[int, ...], dtype, paged: bool):
  """A zeroed cache array (`Int8KV` for int8) created in its shards on the mesh, never whole on
  one device."""
  from jaxllm.model import cache as kv_cache
  if mesh is None:
    return kv_cache.zeros(shape, dtype)
  abstract = jax.eval_shape(lambda: kv_cache.zeros(shape, dtype))
  out = jax.tree.map(lambda a: cache_sharding(mesh, a.shape, paged), abstract)
  return jax.jit(lambda: kv_cache.zeros(shape, dtype), out_shardings=out)()


def bytes_per_device(tree) -> dict:
  """{device: bytes of the tree's shards it holds}."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def total_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def mesh_of(params) -> Mesh | None:
  """The mesh a params tree was placed on (`place_params`), None for single-device params."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def in_mesh(mesh: Mesh | None):
  """Context that makes `mesh` the one `rules.constrain` and `constrain_cache` see while the
  jitted inference steps trace (nothing without a mesh)."""
  import contextlib
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def to_host(tree):
  """numpy copies of a tree of device arrays, also of arrays spread over several processes
  (gathered: every process must call this at the same point, as lockstep serving does)."""
  def one(x):
    if getattr(x, "is_fully_addressable", True):
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)
