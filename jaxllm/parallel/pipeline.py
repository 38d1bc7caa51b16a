"""Pipeline parallelism over the mesh axis `stage`: the stacked layers split into stages.

The layers' leading `[L]` axis is sharded over `stage` by the rules (`layers -> stage`), so stage
s holds layers [s L/p, (s+1) L/p). The batch is cut into m microbatches; `shard_map` runs one
program per stage (manual over `stage` only: data, fsdp and tensor stay with the compiler), and a
loop of m + p - 1 ticks moves activations one stage forward per tick with `ppermute`:

  GPipe: at tick t stage s runs microbatch t - s; the backward pass is the transpose of the
  forward (JAX autodiff through the scan and the ppermutes), so every microbatch's activations
  are kept until the flush. Bubble (idle stage-ticks): (p - 1) / (m + p - 1).

Stage-ticks outside [0, m) compute on placeholder data and are discarded (that is the bubble).
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


def gpipe(layer: Callable, x_BTD: jax.Array, stacked_params, positions_BT: jax.Array,
          segment_ids_BT: jax.Array | None, *, microbatches: int) -> jax.Array:
  """Runs `layer(x_BTD, layer_params, positions_BT, segment_ids_BT) -> x_BTD` over the stacked
  layers `[L, ...]` as a GPipe pipeline over the mesh's `stage` axis; returns `[B, T, D]`."""
  mesh = jax.sharding.get_abstract_mesh()
  p, m = num_stages(), microbatches
  B, T, D = x_BTD.shape
  if B % m:
    raise ValueError(f"batch {B} is not divisible into {m} microbatches")
  has_segments = segment_ids_BT is not None
  if not has_segments:
    segment_ids_BT = jnp.zeros((B, T), jnp.int32)  # a placeholder the layer never sees
  split = lambda a: a.reshape((m, B // m) + a.shape[1:])
  # Activations enter, travel between stages and leave in float32: their cotangents are summed
  # over stages (an all-reduce), which XLA:CPU aborts on in bf16, and the ticks' selects and
  # the final sum of zeros are exact in float32 anyway.
  compute_dtype = x_BTD.dtype
  xs, pos, seg = split(x_BTD.astype(jnp.float32)), split(positions_BT), split(segment_ids_BT)

  def stage_program(local_params, xs, pos, seg):
    s = jax.lax.axis_index(AXIS)

    def run_stage(h, pos_mb, seg_mb):
      def one(h, layer_params):
        return layer(h, layer_params, pos_mb, seg_mb if has_segments else None), None
      return jax.lax.scan(one, h, local_params)[0]

    def tick(carry, t):
      state, outputs = carry
      i = jnp.clip(t - s, 0, m - 1)  # the microbatch this stage works on (if any)
      h = jnp.where(s == 0, xs[i], state).astype(compute_dtype)
      out = run_stage(h, pos[i], seg[i]).astype(jnp.float32)
      keep = (s == p - 1) & (t - s >= 0) & (t - s < m)
      outputs = outputs.at[i].set(jnp.where(keep, out, outputs[i]))
      state = jax.lax.ppermute(out, AXIS, [(j, (j + 1) % p) for j in range(p)])
      return (state, outputs), None

    init = (jnp.zeros(xs.shape[1:], jnp.float32), jnp.zeros(xs.shape, jnp.float32))
    (_, outputs), _ = jax.lax.scan(tick, init, jnp.arange(m + p - 1))
    # Only the last stage holds results; the sum hands them to every stage.
    return jax.lax.psum(jnp.where(s == p - 1, outputs, jnp.zeros_like(outputs)), AXIS)

  param_specs = jax.tree.map(lambda _: P(AXIS), stacked_params)
  run = jax.shard_map(stage_program, mesh=mesh, in_specs=(param_specs, P(), P(), P()),
                      out_specs=P(), axis_names={AXIS}, check_vma=False)
  return run(stacked_params, xs, pos, seg).reshape(B, T, D).astype(compute_dtype)


def bubble_fraction(stages: int, microbatches: int) -> float:
  """GPipe's idle fraction of stage-ticks."""
  return (stages - 1) / (microbatches + stages - 1)
