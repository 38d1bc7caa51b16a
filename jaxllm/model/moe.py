"""Mixture-of-Experts feed-forward layer: router, dispatch to experts, combine.

Shape letters (beside the model's): N tokens (B*T flattened), E experts, k experts per token
(`experts_per_token`), S = N k token-slots, F an expert's hidden width (`moe_d_ff`), C an expert's
capacity in slots, P the expert-parallel degree (`mesh.expert`), El = E / P experts per device.

Routing: logits = x @ router `[N, E]` (float32). "softmax" scores = softmax(logits), "sigmoid"
scores = sigmoid(logits); the k experts with the highest score (+ the auxiliary-loss-free bias,
which steers selection only) are chosen, lower expert index first on ties (`lax.top_k`), and
weighted by their scores (renormalised to sum 1 with `norm_topk_prob`). Each expert is a SwiGLU
MLP; `n_shared_experts` always-on experts run as one dense MLP beside them.

Dispatch, two modes (`capacity_factor`):
  dropless (0)  token-slots are sorted by expert and each expert multiplies its contiguous run of
                rows: grouped matmuls (`jaxllm.ops.moe.grouped_matmul`), no slot ever dropped.
  capacity (>0) GShard: each expert takes at most C = ceil(capacity_factor * S / E) slots per
                batch shard, first choices of all tokens before second choices, in token order;
                the rest are dropped (their tokens keep the residual and other experts). Experts
                then run as one batched matmul over `[E, C, D]`.
Under a mesh, dispatch runs per batch shard inside `shard_map`: with `mesh.expert` = P > 1 the
experts are split over the expert axis and slots travel to their expert's device and back by
`all_to_all` (fixed-size buffers: a device may send all S of its slots to one peer, so dropless
buffers hold P * S rows; capacity buffers E * C). The tensor axis splits each expert's F, with a
psum after the down projection.

Router statistics (sums over tokens, so they add over microbatches, shards and pipeline stages):
`load` [E] slots routed to each expert, `prob` [E] summed routing probabilities, `z` summed
squared log-sum-exp of the logits, `dropped` slots over capacity, `tokens`. `losses` turns them
into the load-balancing and z losses; `update_router_bias` into the bias step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.layers import param
from jaxllm.model.mlp import MLP
from jaxllm.ops import moe as moe_ops
from jaxllm.parallel import rules
from jaxllm.quant import tensor as qtensor
from jaxllm.ops.quant_matmul import project


class Routing(NamedTuple):
  ids: jax.Array  # [..., k] int32 chosen experts
  weights: jax.Array  # [..., k] float32 their combine weights
  probs: jax.Array  # [..., E] float32 routing probabilities (for the balancing loss)
  log_z: jax.Array  # [...] float32 logsumexp of the logits (for the z-loss)


def route(logits: jax.Array, k: int, *, router: str = "softmax", norm_topk_prob: bool = False,
          bias: jax.Array | None = None) -> Routing:
  """Top-k routing of float32 router logits `[..., E]`; `bias` `[E]` shifts selection only."""
  logits = logits.astype(jnp.float32)
  if router == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  select = scores
  if bias is not None:
    select = scores + jax.lax.stop_gradient(bias).reshape((1,) * (scores.ndim - 1) + (-1,))
  _, ids = jax.lax.top_k(select, k)
  weights = jnp.take_along_axis(scores, ids, axis=-1)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(ids.astype(jnp.int32), weights, probs, jax.nn.logsumexp(logits, axis=-1))


def routing_stats(r: Routing, n_experts: int) -> dict[str, jax.Array]:
  """Sums over all tokens of one layer's routing (see the module docstring); `dropped` is 0."""
  ids = r.ids.reshape(-1)
  load = jnp.zeros((n_experts,), jnp.float32).at[ids].add(1.0)
  return {"load": load, "prob": jnp.sum(r.probs.reshape(-1, n_experts), axis=0),
          "z": jnp.sum(jnp.square(r.log_z)), "dropped": jnp.zeros((), jnp.float32),
          "tokens": jnp.asarray(r.log_z.size, jnp.float32)}


def losses(stats: dict[str, jax.Array], k: int) -> tuple[jax.Array, jax.Array]:
  """(load-balancing loss, z-loss), each averaged over MoE layers, from stats `[Lm, ...]`.

  Balancing (Switch/GShard): E * sum_e f_e * P_e with f_e = load_e / (tokens k) the fraction of
  slots expert e got (not differentiable) and P_e = prob_e / tokens its mean probability; 1 when
  balanced. z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
  """
  tokens = jnp.maximum(stats["tokens"], 1.0)
  E = stats["load"].shape[-1]
  f = jax.lax.stop_gradient(stats["load"]) / (tokens[:, None] * k)
  p = stats["prob"] / tokens[:, None]
  aux = E * jnp.sum(f * p, axis=-1)
  return jnp.mean(aux), jnp.mean(stats["z"] / tokens)


def load_summary(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-layer load metrics from stats `[Lm, ...]`: `load` `[Lm, E]` (fraction of slots per
  expert), `max_load` `[Lm]` (largest fraction over the mean: 1 when balanced, E when one expert
  takes everything), `entropy` `[Lm]` (of the load, in nats; log E when balanced) and
  `dropped` `[Lm]` (fraction of slots over capacity)."""
  load = stats["load"]
  total = jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)
  frac = load / total
  E = load.shape[-1]
  entropy = -jnp.sum(jnp.where(frac > 0, frac * jnp.log(jnp.where(frac > 0, frac, 1.0)), 0.0),
                     axis=-1)
  return {"load": frac, "max_load": jnp.max(frac, axis=-1) * E, "entropy": entropy,
          "dropped": stats["dropped"] / total[:, 0]}


def update_router_bias(bias_LE: jax.Array, load_LE: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's auxiliary-loss-free step: each expert's selection bias moves by `rate`
  towards balance (down when it took more than the mean load, up when less)."""
  mean = jnp.mean(load_LE, axis=-1, keepdims=True)
  return bias_LE + rate * jnp.sign(mean - load_LE)


# --------------------------------------------------------------------------------- dispatch


class Experts(NamedTuple):
  """The experts' SwiGLU weights: gate, up `[E, D, F]`, down `[E, F, D]` (arrays or QTensors)."""
  gate: jax.Array
  up: jax.Array
  down: jax.Array


def _inverse(perm: jax.Array) -> jax.Array:
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _grouped_hidden(x_SD, ex: Experts, group_sizes, impl: str):
  """silu(x @ gate_e) * (x @ up_e) over rows sorted by expert -> float32 `[S, F]`."""
  gate = moe_ops.grouped_matmul(x_SD, ex.gate, group_sizes, impl=impl)
  up = moe_ops.grouped_matmul(x_SD, ex.up, group_sizes, impl=impl)
  return jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)


def _grouped_ffn(x_SD, ex: Experts, group_sizes, impl: str, tensor_axis: str | None):
  """SwiGLU experts over rows sorted by expert -> float32 `[S, D]`."""
  h = _grouped_hidden(x_SD, ex, group_sizes, impl)
  y = moe_ops.grouped_matmul(h.astype(x_SD.dtype), ex.down, group_sizes, impl=impl)
  y = y.astype(jnp.float32)
  return jax.lax.psum(y, tensor_axis) if tensor_axis else y


def _batched_ffn(x_ECD, ex: Experts, tensor_axis: str | None):
  """SwiGLU experts over capacity buffers `[E, C, D]` -> float32 `[E, C, D]`."""
  dt = x_ECD.dtype
  gate = jnp.einsum("ecd,edf->ecf", x_ECD, ex.gate.astype(dt), preferred_element_type=jnp.float32)
  up = jnp.einsum("ecd,edf->ecf", x_ECD, ex.up.astype(dt), preferred_element_type=jnp.float32)
  h = (jax.nn.silu(gate) * up).astype(dt)
  y = jnp.einsum("ecf,efd->ecd", h, ex.down.astype(dt), preferred_element_type=jnp.float32)
  return jax.lax.psum(y, tensor_axis) if tensor_axis else y


def dropless(x_ND: jax.Array, ids_Nk: jax.Array, ex: Experts, *, impl: str = "auto",
             expert_axis: str | None = None, tensor_axis: str | None = None) -> jax.Array:
  """Every slot's expert output, float32 `[N, k, D]` (slot (n, j) ran expert ids[n, j]).

  Without `expert_axis` the E experts are all local. With it (inside `shard_map`), this
  device holds experts [p El, (p + 1) El) of the P along the axis and exchanges slots with its
  peers; `ids` are global expert ids.
  """
  N, k = ids_Nk.shape
  S, D = N * k, x_ND.shape[-1]
  El = jax.tree.leaves(ex.gate)[0].shape[0]  # local experts (a QTensor's values lead with them)
  flat = ids_Nk.reshape(S)
  order = jnp.argsort(flat, stable=True)  # slots by expert (so by destination device)
  x_sorted = x_ND[order // k]
  if expert_axis is None:
    sizes = jnp.zeros((El,), jnp.int32).at[flat].add(1)
    y_sorted = _grouped_ffn(x_sorted, ex, sizes, impl, tensor_axis)
  else:
    P = jax.lax.axis_size(expert_axis)
    e_sorted = flat[order]
    dest = e_sorted // El
    counts = jnp.zeros((P,), jnp.int32).at[dest].add(1)
    row = jnp.arange(S, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[dest]
    send_x = jnp.zeros((P, S, D), x_ND.dtype).at[dest, row].set(x_sorted)
    send_e = jnp.full((P, S), El, jnp.int32).at[dest, row].set(e_sorted % El)
    recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0).reshape(P * S, D)
    recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0).reshape(P * S)
    local_order = jnp.argsort(recv_e, stable=True)  # padding (id El) sorts last
    sizes = jnp.zeros((El,), jnp.int32).at[recv_e].add(1, mode="drop")
    y_local = _grouped_ffn(recv_x[local_order], ex, sizes, impl, tensor_axis)
    y_recv = y_local[_inverse(local_order)].reshape(P, S, D)
    y_back = jax.lax.all_to_all(y_recv, expert_axis, 0, 0)
    y_sorted = y_back[dest, row]
  return y_sorted[_inverse(order)].reshape(N, k, D)


def expert_hidden(x_ND: jax.Array, ids_Nk: jax.Array, ex: Experts, *,
                  impl: str = "auto") -> jax.Array:
  """Each slot's down-projection input silu(x @ gate_e) * (x @ up_e), float32 `[N, k, F]`
  (all experts local; calibration measures each expert's inputs with it)."""
  N, k = ids_Nk.shape
  El = jax.tree.leaves(ex.gate)[0].shape[0]
  flat = ids_Nk.reshape(N * k)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.zeros((El,), jnp.int32).at[flat].add(1)
  h = _grouped_hidden(x_ND[order // k], ex, sizes, impl)
  return h[_inverse(order)].reshape(N, k, -1)


def capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
  """Slots each expert accepts from one batch shard of n_tokens tokens."""
  return max(1, math.ceil(factor * n_tokens * k / n_experts))


def with_capacity(x_ND: jax.Array, ids_Nk: jax.Array, ex: Experts, *, factor: float,
                  n_experts: int, expert_axis: str | None = None,
                  tensor_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
  """GShard dispatch: (float32 `[N, k, D]` slot outputs, zero for dropped slots; the number of
  dropped slots). Experts and axes as in `dropless`."""
  N, k = ids_Nk.shape
  D, E = x_ND.shape[-1], n_experts
  C = capacity(N, k, E, factor)
  # Priority order: choice j of token n is slot j N + n (all first choices first).
  flat = ids_Nk.T.reshape(k * N)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.zeros((E,), jnp.int32).at[flat].add(1)
  rank_sorted = jnp.arange(k * N, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[flat[order]]
  rank = rank_sorted[_inverse(order)]
  keep = rank < C
  slot = jnp.where(keep, flat * C + rank, E * C)  # E * C: out of range, dropped
  token = jnp.arange(k * N, dtype=jnp.int32) % N
  buf = jnp.zeros((E * C, D), x_ND.dtype).at[slot].set(x_ND[token], mode="drop")
  buf = buf.reshape(E, C, D)
  if expert_axis is None:
    y = _batched_ffn(buf, ex, tensor_axis)
  else:
    P = jax.lax.axis_size(expert_axis)
    El = E // P
    recv = jax.lax.all_to_all(buf.reshape(P, El, C, D), expert_axis, 0, 0)  # [P(src), El, C, D]
    local = recv.transpose(1, 0, 2, 3).reshape(El, P * C, D)
    y_local = _batched_ffn(local, ex, tensor_axis).reshape(El, P, C, D).transpose(1, 0, 2, 3)
    y = jax.lax.all_to_all(y_local, expert_axis, 0, 0)  # [P(dest), El, C, D]
  y_slots = y.reshape(E * C, D).at[slot].get(mode="fill", fill_value=0)  # [k N, D]
  dropped = jnp.sum(~keep).astype(jnp.float32)
  return y_slots.reshape(k, N, D).transpose(1, 0, 2), dropped


def gathered(x_ND: jax.Array, ids_Nk: jax.Array, ex: Experts) -> jax.Array:
  """Slot outputs `[N, k, D]` (float32) by gathering each slot's expert weights: reads only the
  chosen experts, so a decode step of a few tokens pays for k experts per token, not E."""
  N, k = ids_Nk.shape
  flat = ids_Nk.reshape(N * k)
  dt = x_ND.dtype
  take = lambda w: qtensor.take(w, flat, dt) if qtensor.is_qtensor(w) else w[flat].astype(dt)
  x_SD = jnp.repeat(x_ND, k, axis=0)
  gate = jnp.einsum("sd,sdf->sf", x_SD, take(ex.gate), preferred_element_type=jnp.float32)
  up = jnp.einsum("sd,sdf->sf", x_SD, take(ex.up), preferred_element_type=jnp.float32)
  h = (jax.nn.silu(gate) * up).astype(dt)
  y = jnp.einsum("sf,sfd->sd", h, take(ex.down), preferred_element_type=jnp.float32)
  return y.reshape(N, k, -1)


# ------------------------------------------------------------------------------------ layer


class MoE(nnx.Module):
  """Routed experts (+ shared experts): x `[B, T, D]` -> (y `[B, T, D]`, routing stats)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    E, D, F = cfg.n_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.router = param(rngs, (D, E), ("embed", None), cfg.init_std, pd)
    if cfg.router_bias_update_rate > 0:
      # Not trained: the train step overwrites it with `update_router_bias`.
      self.router_bias = nnx.Param(jnp.zeros((E,), jnp.float32), axes=(None,))
    self.gate = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg.init_std, pd)
    self.up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg.init_std, pd)
    self.down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), out_std, pd)
    if cfg.n_shared_experts:
      self.shared = MLP(cfg, d_ff=cfg.n_shared_experts * F, rngs=rngs)
      if cfg.shared_expert_gate:
        self.shared_gate = param(rngs, (D, 1), ("embed", None), cfg.init_std, pd)
    self.k = cfg.experts_per_token
    self.n_experts = E
    self.router_kind = cfg.router
    self.norm_topk_prob = cfg.norm_topk_prob
    self.capacity_factor = cfg.capacity_factor
    self.impl = cfg.moe_impl

  def route(self, x_BTD: jax.Array) -> Routing:
    logits = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    bias = self.router_bias[...] if hasattr(self, "router_bias") else None
    return route(logits, self.k, router=self.router_kind, norm_topk_prob=self.norm_topk_prob,
                 bias=bias)

  def experts(self) -> Experts:
    return Experts(self.gate[...], self.up[...], self.down[...])

  def _shared(self, x_BTD: jax.Array) -> jax.Array:
    y = self.shared(x_BTD)
    if hasattr(self, "shared_gate"):
      g = jax.nn.sigmoid(project(x_BTD.astype(jnp.float32),
                                 self.shared_gate[...].astype(jnp.float32)))
      y = (g * y.astype(jnp.float32)).astype(x_BTD.dtype)
    return y

  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training / full forward: the configured dispatch (dropless or capacity)."""
    r = self.route(x_BTD)
    y_BTD, dropped = _dispatch(x_BTD, r, self.experts(), capacity_factor=self.capacity_factor,
                               n_experts=self.n_experts, impl=self.impl)
    stats = routing_stats(r, self.n_experts)
    stats["dropped"] = dropped
    if hasattr(self, "shared"):
      y_BTD = y_BTD + self._shared(x_BTD)
    return y_BTD, stats

  def infer(self, x_BTD: jax.Array) -> jax.Array:
    """Inference (prefill chunks, decode steps): always dropless, so a token's output never
    depends on the rest of the batch; with few tokens (N k <= E) each slot gathers its own
    expert's weights instead of running grouped matmuls over all E."""
    r = self.route(x_BTD)
    B, T, D = x_BTD.shape
    if B * T * self.k <= self.n_experts and jax.sharding.get_abstract_mesh().empty:
      slots = gathered(x_BTD.reshape(B * T, D), r.ids.reshape(B * T, self.k), self.experts())
      y_BTD = _combine(slots, r.weights.reshape(B * T, self.k)).reshape(B, T, D)
      y_BTD = y_BTD.astype(x_BTD.dtype)
    else:
      y_BTD, _ = _dispatch(x_BTD, r, self.experts(), capacity_factor=0.0,
                           n_experts=self.n_experts, impl=self.impl)
    if hasattr(self, "shared"):
      y_BTD = y_BTD + self._shared(x_BTD)
    return y_BTD


def _combine(slots_NkD: jax.Array, weights_Nk: jax.Array) -> jax.Array:
  return jnp.einsum("nkd,nk->nd", slots_NkD, weights_Nk)


def _dispatch(x_BTD, r: Routing, ex: Experts, *, capacity_factor: float, n_experts: int,
              impl: str) -> tuple[jax.Array, jax.Array]:
  """Routed experts' combined output `[B, T, D]` (x's dtype) and the dropped-slot count, per
  batch shard under a mesh (see the module docstring)."""
  B, T, D = x_BTD.shape
  k = r.ids.shape[-1]

  def local(x, ids, w, gate, up, down, expert_axis, tensor_axis, batch_axes):
    n = x.shape[0] * x.shape[1]
    x_ND, ids_Nk = x.reshape(n, D), ids.reshape(n, k)
    ex_local = Experts(gate, up, down)
    if capacity_factor > 0:
      slots, dropped = with_capacity(x_ND, ids_Nk, ex_local, factor=capacity_factor,
                                     n_experts=n_experts, expert_axis=expert_axis,
                                     tensor_axis=tensor_axis)
    else:
      slots = dropless(x_ND, ids_Nk, ex_local, impl=impl, expert_axis=expert_axis,
                       tensor_axis=tensor_axis)
      dropped = jnp.zeros((), jnp.float32)
    if batch_axes:
      dropped = jax.lax.psum(dropped, batch_axes)
    y = _combine(slots, w.reshape(n, k)).reshape(x.shape).astype(x.dtype)
    return y, dropped

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(x_BTD, r.ids, r.weights, *ex, None, None, ())
  sizes = dict(mesh.shape)
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  batch_axes = rules.batch_axes(mesh)
  shards = math.prod(sizes[a] for a in batch_axes)
  if B % shards:
    raise ValueError(f"the MoE layer's batch {B} does not split over the {shards} batch shards "
                     f"({' x '.join(batch_axes)})")
  expert_axis = "expert" if "expert" in batch_axes else None
  if expert_axis and n_experts % sizes["expert"]:
    raise ValueError(f"{n_experts} experts do not split over mesh.expert={sizes['expert']}")
  F = ex.gate.shape[-1]
  tp = sizes.get("tensor", 1)
  tensor_axis = ("tensor" if tp > 1 and "tensor" not in manual and F % tp == 0
                 and not qtensor.is_qtensor(ex.gate) else None)
  P = jax.sharding.PartitionSpec
  b = batch_axes or None
  act = P(b, None, None)
  in_specs = (act, act, act, P(expert_axis, None, tensor_axis), P(expert_axis, None, tensor_axis),
              P(expert_axis, tensor_axis, None))
  axes = set(batch_axes) | ({tensor_axis} if tensor_axis else set())
  if not axes:
    return local(x_BTD, r.ids, r.weights, *ex, None, None, ())
  if qtensor.is_qtensor(ex.gate):  # quantized experts run dequantized inside the map
    ex = Experts(*(w.astype(x_BTD.dtype) for w in ex))
  run = jax.shard_map(
      lambda x, ids, w, g, u, d: local(x, ids, w, g, u, d, expert_axis, tensor_axis, batch_axes),
      mesh=mesh, in_specs=in_specs, out_specs=(act, P()), axis_names=axes, check_vma=False)
  return run(x_BTD, r.ids, r.weights, *ex)
