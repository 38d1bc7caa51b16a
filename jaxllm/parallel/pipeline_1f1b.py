"""The 1F1B pipeline schedule (one forward, one backward; PipeDream-flush) over the mesh axis
`stage`, for training: forward, loss and backward of every microbatch in one loop of ticks.

GPipe and the circular schedule (`jaxllm.parallel.pipeline`) run every microbatch's forward,
then let autodiff run the backward after the flush: each stage keeps all m microbatches'
activations. Here the backward of a microbatch starts as soon as its forward leaves the last
stage, which the loss must therefore see at once: the last stage runs the head and the loss
(`head`) on each microbatch, and its cotangent travels back one stage per tick, beside the
activations travelling forward. In tick t stage s runs

  forward  of microbatch t - s                (its input stashed),
  backward of microbatch t - (2 (p - 1) - s)  (from its stashed input: the stage's forward is
                                               recomputed inside the backward, as remat would),

so a stage holds at most 2 (p - s) - 1 stashed inputs, whatever m is (GPipe: m). There are
m + 2 (p - 1) ticks of a forward and a backward slot each; a slot with no microbatch skips its
work (`lax.cond` on the stage's own predicate), so the first p - 1 ticks cost a forward, the
last p - 1 a backward, the m between both: (m + p - 1) (F + B) in all when the stages run in
parallel, GPipe's bubble (p - 1) / (m + p - 1) (`pipeline.bubble_fraction`). The backward recomputes the stage's forward
(B = 3 F against autodiff's 2 F without remat): 1F1B trades a third more compute for
activation memory that does not grow with m.

Autodiff cannot produce this order, so the schedule computes the gradients itself (`jax.vjp`
per stage and tick) inside a `jax.custom_vjp` whose backward rule only scales them by the
incoming cotangent: to the rest of the model the pipeline is a differentiable function
(stage params, head params, input activations) -> summed loss.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.pipeline import AXIS, num_stages


def stash_size(stages: int, microbatches: int) -> int:
  """Stage inputs a stage keeps at most (stage 0; stage s keeps 2 (p - s) - 1)."""
  return min(microbatches, 2 * stages - 1)


def run(layer: Callable, head: Callable, x_BTD: jax.Array, stacked_params, head_params,
        positions_BT: jax.Array, segment_ids_BT: jax.Array | None, targets_BT: jax.Array,
        weights_BT: jax.Array, *, microbatches: int):
  """(summed loss, (summed NLL, summed token weight)) of the stacked layers `[L, ...]` run as a
  1F1B pipeline over the mesh's `stage` axis, then `head`.

  `layer(x_BTD, layer_params, positions_BT, segment_ids_BT) -> (x_BTD, None)` (dense layers:
  the MoE statistics do not decompose over microbatches); `head(x_BTD, head_params,
  targets_BT, weights_BT) -> (loss, (nll, weight))`, float32 sums over the microbatch. The
  loss is differentiable with respect to `stacked_params` (its floating-point leaves),
  `head_params` and `x_BTD`.
  """
  leaves, treedef = jax.tree.flatten(stacked_params)
  is_float = tuple(jnp.issubdtype(a.dtype, jnp.inexact) for a in leaves)
  floats = [a for a, f in zip(leaves, is_float) if f]
  others = [a for a, f in zip(leaves, is_float) if not f]
  has_segments = segment_ids_BT is not None
  if not has_segments:
    segment_ids_BT = jnp.zeros(positions_BT.shape, jnp.int32)  # a placeholder

  def rebuild(floats, others):
    it_f, it_o = iter(floats), iter(others)
    return jax.tree.unflatten(treedef, [next(it_f) if f else next(it_o) for f in is_float])

  def stage_layer(h, params, pos, seg):
    return layer(h, params, pos, seg if has_segments else None)

  return _pipeline_loss(stage_layer, head, rebuild, microbatches, floats, others, head_params,
                        x_BTD, positions_BT, segment_ids_BT, targets_BT, weights_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _pipeline_loss(layer, head, rebuild, microbatches, floats, others, head_params, x_BTD,
                   positions_BT, segment_ids_BT, targets_BT, weights_BT):
  loss, aux, _ = _schedule(layer, head, rebuild, microbatches, floats, others, head_params,
                           x_BTD, positions_BT, segment_ids_BT, targets_BT, weights_BT)
  return loss, aux


def _forward(layer, head, rebuild, microbatches, floats, others, head_params, x_BTD,
             positions_BT, segment_ids_BT, targets_BT, weights_BT):
  loss, aux, grads = _schedule(layer, head, rebuild, microbatches, floats, others, head_params,
                               x_BTD, positions_BT, segment_ids_BT, targets_BT, weights_BT)
  return (loss, aux), grads


def _backward(layer, head, rebuild, microbatches, grads, cotangents):
  ct_loss, _ = cotangents  # the NLL and weight outputs are reported, not differentiated
  scale = lambda tree: jax.tree.map(lambda g: (g * ct_loss).astype(g.dtype), tree)
  g_floats, g_head, g_x = grads
  return (scale(g_floats), None, scale(g_head), scale(g_x), None, None, None, None)


_pipeline_loss.defvjp(_forward, _backward)


def _schedule(layer, head, rebuild, microbatches, floats, others, head_params, x_BTD,
              positions_BT, segment_ids_BT, targets_BT, weights_BT):
  """(loss, (nll, weight), (grads of floats, of head_params, of x_BTD)) by the 1F1B ticks."""
  mesh = jax.sharding.get_abstract_mesh()
  p, m = num_stages(), microbatches
  B, T, D = x_BTD.shape
  L = floats[0].shape[0]
  if B % m:
    raise ValueError(f"batch {B} is not divisible into {m} microbatches")
  if L % p:
    raise ValueError(f"{L} layers do not split into {p} stages")
  K = stash_size(p, m)
  compute_dtype = x_BTD.dtype
  # Microbatch j takes rows j, j + m, ...: each keeps an equal share of every batch shard, so
  # picking a microbatch inside a stage's branch never moves rows between devices (a
  # collective inside a branch only some devices take would hang).
  split = lambda a: a.reshape((B // m, m) + a.shape[1:]).swapaxes(0, 1)
  # Activations and cotangents travel and wait in float32 (see `pipeline.run`).
  xs = split(x_BTD.astype(jnp.float32))
  pos, seg, tgt, wts = (split(a) for a in (positions_BT, segment_ids_BT, targets_BT,
                                           weights_BT))

  def stage_program(floats, others, head_params, xs, pos, seg, tgt, wts):
    s = jax.lax.axis_index(AXIS)

    def stage_forward(h, floats, j):
      params = rebuild(floats, others)
      out, _ = jax.lax.scan(lambda c, lp: layer(c, lp, pos[j], seg[j]),
                            h.astype(compute_dtype), params)
      return out.astype(jnp.float32)

    def head_step(y, j):
      """At the last stage: the microbatch's loss and its cotangents (y, head params)."""
      loss, pull, (nll, w) = jax.vjp(
          lambda y, hp: head(y.astype(compute_dtype), hp, tgt[j], wts[j]), y, head_params,
          has_aux=True)
      dy, dhead = pull(jnp.ones((), jnp.float32))
      return loss, nll, w, dy.astype(jnp.float32), dhead

    def no_head(y, j):
      zero = jnp.zeros((), jnp.float32)
      return zero, zero, zero, jnp.zeros_like(y), jax.tree.map(jnp.zeros_like, head_params)

    def tick(carry, t):
      fwd_in, bwd_in, stash, g_acc, gh_acc, dxs, sums = carry
      # Forward slot: microbatch jf enters this stage.
      jf = t - s
      live_f = (jf >= 0) & (jf < m)
      jf = jnp.clip(jf, 0, m - 1)
      h_in = jnp.where(s == 0, xs[jf], fwd_in)
      stash = stash.at[jf % K].set(jnp.where(live_f, h_in, stash[jf % K]))
      # Idle slots skip their work (a branch per stage: the bubble costs no compute).
      h_out = jax.lax.cond(live_f, lambda h: stage_forward(h, floats, jf), jnp.zeros_like, h_in)
      # The last stage turns the output into the loss and its cotangent at once.
      last = live_f & (s == p - 1)
      loss, nll, w, dy, dhead = jax.lax.cond(last, head_step, no_head, h_out, jf)
      sums = sums + jnp.stack([loss, nll, w])
      gh_acc = jax.tree.map(jnp.add, gh_acc, dhead)
      # Backward slot: microbatch jb leaves this stage backwards.
      jb = t - (2 * (p - 1) - s)
      live_b = (jb >= 0) & (jb < m)
      jb = jnp.clip(jb, 0, m - 1)
      ct = jnp.where(s == p - 1, dy, bwd_in)

      def backward(h, ct):
        _, pull = jax.vjp(lambda h, f: stage_forward(h, f, jb), h, floats)
        return pull(ct)

      def idle(h, ct):
        return jnp.zeros_like(h), jax.tree.map(jnp.zeros_like, floats)

      dh, dfloats = jax.lax.cond(live_b, backward, idle, stash[jb % K], ct)
      g_acc = jax.tree.map(jnp.add, g_acc, dfloats)
      dxs = dxs.at[jb].set(jnp.where(live_b & (s == 0), dh, dxs[jb]))
      fwd_in = jax.lax.ppermute(h_out, AXIS, [(i, (i + 1) % p) for i in range(p)])
      bwd_in = jax.lax.ppermute(dh, AXIS, [(i, (i - 1) % p) for i in range(p)])
      return (fwd_in, bwd_in, stash, g_acc, gh_acc, dxs, sums), None

    act = jnp.zeros(xs.shape[1:], jnp.float32)
    init = (act, act, jnp.zeros((K,) + xs.shape[1:], jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), floats),
            jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), head_params),
            jnp.zeros(xs.shape, jnp.float32), jnp.zeros((3,), jnp.float32))
    (_, _, _, g_acc, gh_acc, dxs, sums), _ = jax.lax.scan(tick, init,
                                                          jnp.arange(m + 2 * (p - 1)))
    # The head's results live on the last stage, the input cotangents on the first: each
    # stage returns its own, stacked over stages, and the caller takes the one it needs.
    return sums[None], g_acc, jax.tree.map(lambda a: a[None], gh_acc), dxs[None]

  stage_specs = [P(AXIS)] * len(floats)
  program = jax.shard_map(
      stage_program, mesh=mesh,
      in_specs=(stage_specs, [P(AXIS)] * len(others), jax.tree.map(lambda _: P(), head_params),
                P(), P(), P(), P(), P()),
      out_specs=(P(AXIS), stage_specs, jax.tree.map(lambda _: P(AXIS), head_params), P(AXIS)),
      axis_names={AXIS}, check_vma=False)
  sums, g_floats, g_head, dxs = program(floats, others, head_params, xs, pos, seg, tgt, wts)
  sums, g_head, dxs = sums[p - 1], jax.tree.map(lambda a: a[p - 1], g_head), dxs[0]
  g_floats = [g.astype(a.dtype) for g, a in zip(g_floats, floats)]
  g_head = jax.tree.map(lambda g, a: g.astype(a.dtype), g_head, head_params)
  g_x = dxs.swapaxes(0, 1).reshape(B, T, D).astype(x_BTD.dtype)
  return sums[0], (sums[1], sums[2]), (g_floats, g_head, g_x)
