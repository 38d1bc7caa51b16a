"""Pipeline parallelism over the mesh axis `stage`: the stacked layers split into stages.

The layers' leading `[L]` axis is sharded over `stage` by the rules (`layers -> stage`). The
batch is cut into m microbatches; `shard_map` runs one program per stage (manual over `stage`
only: data, fsdp and tensor stay with the compiler), and a loop of ticks moves activations one
stage forward per tick with `ppermute`. The backward pass is the transpose of the forward (JAX
autodiff through the loop and the ppermutes), so activations are kept until the flush.

  GPipe (chunks v = 1): stage s holds layers [s L/p, (s+1) L/p); at tick t it runs microbatch
  t - s. m + p - 1 ticks; bubble (p - 1) / (m + p - 1).
  Circular (v > 1, needs m >= p): the layers are cut into p v chunks and stage s holds chunks
  s, s + p, s + 2p, ...; each microbatch goes around the ring v times, and stage 0 parks the
  microbatches coming back from stage p - 1 until their next round. m v + p - 1 ticks of 1/v
  the work; bubble (p - 1) / (m v + p - 1). The chunk-to-stage assignment differs from the
  contiguous one the parameters are stored in, so the stacked parameters are permuted (and
  their gradients permuted back) on entry: one all-to-all of the layer weights per step.

Stage-ticks with no work item compute on placeholder data and are discarded (that is the bubble).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "stage"


def num_stages() -> int:
  """Size of the `stage` axis of the mesh in context (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def run(layer: Callable, x_BTD: jax.Array, stacked_params, positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None, *, microbatches: int, chunks: int = 1):
  """Runs `layer(x_BTD, layer_params, positions_BT, segment_ids_BT) -> (x_BTD, aux)` over the
  stacked layers `[L, ...]` as a pipeline over the mesh's `stage` axis (GPipe for chunks=1,
  circular with `chunks` chunks per stage otherwise).

  Returns (`[B, T, D]`, aux stacked `[L, ...]` and summed over microbatches). `aux` is a
  pytree of per-layer sums (the MoE routing statistics; None for dense layers), so the sum over
  microbatches equals one pass over the whole batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  p, m, v = num_stages(), microbatches, chunks
  B, T, D = x_BTD.shape
  L = jax.tree.leaves(stacked_params)[0].shape[0]
  if B % m:
    raise ValueError(f"batch {B} is not divisible into {m} microbatches")
  if L % (p * v):
    raise ValueError(f"{L} layers do not split into {p} stages x {v} chunks")
  if v > 1 and m < p:
    raise ValueError(f"the circular schedule needs microbatches ({m}) >= stages ({p})")
  has_segments = segment_ids_BT is not None
  if not has_segments:
    segment_ids_BT = jnp.zeros((B, T), jnp.int32)  # a placeholder the layer never sees
  split = lambda a: a.reshape((m, B // m) + a.shape[1:])
  # Activations enter, travel between stages and leave in float32: their cotangents are summed
  # over stages (an all-reduce), which XLA:CPU aborts on in bf16, and the ticks' selects and
  # the final sum of zeros are exact in float32 anyway.
  compute_dtype = x_BTD.dtype
  xs, pos, seg = split(x_BTD.astype(jnp.float32)), split(positions_BT), split(segment_ids_BT)
  if v > 1:  # chunk r * p + s must land on stage s, at local slot r
    stacked_params = jax.tree.map(
        lambda a: a.reshape((v, p, L // (p * v)) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape),
        stacked_params)

  U = L // (p * v)  # layers per chunk
  aux_shapes = jax.eval_shape(
      lambda h, lp: layer(h, lp, pos[0], seg[0] if has_segments else None)[1],
      jax.ShapeDtypeStruct(xs.shape[1:], compute_dtype),
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked_params))

  def stage_program(local_params, xs, pos, seg):
    s = jax.lax.axis_index(AXIS)
    chunk_params = jax.tree.map(lambda a: a.reshape((v, a.shape[0] // v) + a.shape[1:]),
                                local_params)

    def run_chunk(h, r, pos_mb, seg_mb):
      def one(h, layer_params):
        return layer(h, layer_params, pos_mb, seg_mb if has_segments else None)
      return jax.lax.scan(one, h, jax.tree.map(lambda a: a[r], chunk_params))

    def tick(carry, t):
      state, parked, outputs, aux_sum = carry
      w = t - s  # this stage's work item: round r of microbatch j
      live = (w >= 0) & (w < m * v)
      wc = jnp.clip(w, 0, m * v - 1)
      r, j = wc // m, wc % m
      first = jnp.where(r == 0, xs[j], parked[j])  # stage 0: fresh input or back from the ring
      h = jnp.where(s == 0, first, state).astype(compute_dtype)
      out, aux = run_chunk(h, r, pos[j], seg[j])
      out = out.astype(jnp.float32)
      aux_sum = jax.tree.map(lambda acc, a: acc.at[r].add(jnp.where(live, a, jnp.zeros_like(a))),
                             aux_sum, aux)
      keep = live & (s == p - 1) & (r == v - 1)
      outputs = outputs.at[j].set(jnp.where(keep, out, outputs[j]))
      state = jax.lax.ppermute(out, AXIS, [(i, (i + 1) % p) for i in range(p)])
      # What stage 0 just received left stage p - 1 at this tick: park it for its next round.
      w_back = t - (p - 1)
      back_j = jnp.clip(w_back, 0, m * v - 1) % m
      park = (s == 0) & (w_back >= 0) & (w_back < m * v)
      parked = parked.at[back_j].set(jnp.where(park, state, parked[back_j]))
      return (state, parked, outputs, aux_sum), None

    zeros = jnp.zeros(xs.shape, jnp.float32)
    aux_zeros = jax.tree.map(lambda a: jnp.zeros((v, U) + a.shape, a.dtype), aux_shapes)
    init = (jnp.zeros(xs.shape[1:], jnp.float32), zeros, zeros, aux_zeros)
    (_, _, outputs, aux_sum), _ = jax.lax.scan(tick, init, jnp.arange(m * v + p - 1))
    # Only the last stage holds results; the sum hands them to every stage.
    return jax.lax.psum(jnp.where(s == p - 1, outputs, jnp.zeros_like(outputs)), AXIS), aux_sum

  param_specs = jax.tree.map(lambda _: P(AXIS), stacked_params)
  aux_specs = jax.tree.map(lambda _: P(AXIS), aux_shapes)
  program = jax.shard_map(stage_program, mesh=mesh, in_specs=(param_specs, P(), P(), P()),
                          out_specs=(P(), aux_specs), axis_names={AXIS}, check_vma=False)
  out, aux = program(stacked_params, xs, pos, seg)
  # Stage s's chunk r holds layers (r p + s) U ...: back to depth order.
  aux = jax.tree.map(
      lambda a: a.reshape((p, v, U) + a.shape[2:]).swapaxes(0, 1).reshape((L,) + a.shape[2:]),
      aux)
  return out.reshape(B, T, D).astype(compute_dtype), aux


def bubble_fraction(stages: int, microbatches: int, chunks: int = 1) -> float:
  """Idle fraction of stage time: GPipe (chunks=1) or circular with `chunks` per stage."""
  return (stages - 1) / (microbatches * chunks + stages - 1)
