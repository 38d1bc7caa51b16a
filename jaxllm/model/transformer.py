"""Llama-style decoder-only transformer with stacked, scanned layers.

Shape letters: B batch, T query length, S cache length, D d_model, H query heads, K kv heads,
Dh head dim, F mlp width, V vocab, L layers.

The blocks live in stacked `Block` modules whose parameters carry a leading layer axis
(logical axis `layers`): all `n_layers` in `blocks` for a dense model; an MoE model keeps its
dense layers in `blocks` and its MoE layers in `moe_blocks` (`LayerLayout`). The forward pass
runs them with `jax.lax.scan`, so compile time and program size do not grow with depth.
Master parameters stay in `param_dtype`; activations and matmuls run in `dtype`; norms,
softmax and logits are float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.cache import KVCache, PagedKVCache, Stream
from jaxllm.model.attention import Attention
from jaxllm.model.layers import RMSNorm, param
from jaxllm.model.mlp import MLP
from jaxllm.model.moe import MoE
from jaxllm.ops import quant_matmul, stacked
from jaxllm.parallel import pipeline, pipeline_1f1b, placement, rules

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The weight matmuls' outputs go to host memory in the forward and come back for the
    # backward: device memory of "full", recomputation of "dots_no_batch".
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device",
                                                                           "pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class LayerLayout:
  """Which layers are dense and which MoE: `prefix` dense layers, then `groups` groups of
  `group` layers whose last is MoE, then `suffix` dense layers (a dense model: prefix = L).

  Dense layers live in one stacked `blocks` `[Ld, ...]` and MoE layers in `moe_blocks`
  `[Lm, ...]`, each scanned; dense layer j and MoE layer g sit at the model depths
  `dense_depths()[j]` and `moe_depths()[g]` (the KV cache's layer index)."""
  prefix: int
  groups: int
  group: int
  suffix: int

  @property
  def n_dense(self) -> int:
    return self.prefix + self.groups * (self.group - 1) + self.suffix

  def dense_depths(self) -> np.ndarray:
    f, G, m = self.prefix, self.groups, self.group
    grouped = [f + g * m + i for g in range(G) for i in range(m - 1)]
    suffix = [f + G * m + i for i in range(self.suffix)]
    return np.asarray(list(range(f)) + grouped + suffix, np.int32)

  def moe_depths(self) -> np.ndarray:
    f, m = self.prefix, self.group
    return np.asarray([f + g * m + m - 1 for g in range(self.groups)], np.int32)


def layer_layout(cfg: ModelConfig) -> LayerLayout:
  if not cfg.n_experts:
    return LayerLayout(cfg.n_layers, 0, 1, 0)
  rest = cfg.n_layers - cfg.first_dense_layers
  return LayerLayout(cfg.first_dense_layers, rest // cfg.moe_every, cfg.moe_every,
                     rest % cfg.moe_every)


class Block(nnx.Module):
  """Decoder block: attention, then a dense gated MLP (or with `moe` routed experts), each in a
  residual branch. `cfg.norm_placement` "pre" (Llama): x + f(attn_norm(x)); "post" (OLMo 2):
  x + attn_post_norm(f(x)); "sandwich" (Gemma 2/3): x + attn_post_norm(f(attn_norm(x))),
  likewise for the MLP with mlp_norm / mlp_post_norm."""

  def __init__(self, cfg: ModelConfig, *, moe: bool = False, rngs: nnx.Rngs,
               context_parallel: str = "all_gather"):
    pd = jnp.dtype(cfg.param_dtype)
    norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, pd, offset=cfg.norm_offset)
    pre, post = cfg.norm_placement != "post", cfg.norm_placement != "pre"
    if pre:
      self.attn_norm = norm()
    self.attn = Attention(cfg, rngs=rngs, context_parallel=context_parallel)
    if post:
      self.attn_post_norm = norm()
    if pre:
      self.mlp_norm = norm()
    if moe:
      self.moe = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, rngs=rngs)
    if post:
      self.mlp_post_norm = norm()

  def attn_input(self, x_BTD):
    """The attention's input: the residual stream, normalised under pre-norm."""
    return self.attn_norm(x_BTD) if hasattr(self, "attn_norm") else x_BTD

  def mlp_input(self, x_BTD):
    """The MLP's (or the router's and experts') input."""
    return self.mlp_norm(x_BTD) if hasattr(self, "mlp_norm") else x_BTD

  def attn_residual(self, x_BTD, attn_BTD):
    """The residual stream after the attention branch `attn_BTD` is added."""
    if hasattr(self, "attn_post_norm"):
      attn_BTD = self.attn_post_norm(attn_BTD)
    return x_BTD + attn_BTD

  def mlp_residual(self, x_BTD, mlp_BTD):
    """The residual stream after the MLP (or MoE) branch `mlp_BTD` is added."""
    if hasattr(self, "mlp_post_norm"):
      mlp_BTD = self.mlp_post_norm(mlp_BTD)
    return x_BTD + mlp_BTD

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, depth=None):
    """-> (x `[B, T, D]`, routing stats of an MoE block or None). `depth`: the layer's index
    (models with local and global layers need it)."""
    x_BTD = self.attn_residual(
        x_BTD, self.attn(self.attn_input(x_BTD), positions_BT, segment_ids_BT, depth))
    if hasattr(self, "moe"):
      y_BTD, stats = self.moe(self.mlp_input(x_BTD))
      return self.mlp_residual(x_BTD, y_BTD), stats
    return self.mlp_residual(x_BTD, self.mlp(self.mlp_input(x_BTD))), None

  def extend(self, x_BTD, cache_k, cache_v, layer, lengths_B, num_new_B, page_table_BM,
             stream=None):
    h, cache_k, cache_v = self.attn.extend(self.attn_input(x_BTD), cache_k, cache_v, layer,
                                           lengths_B, num_new_B, page_table_BM, stream)
    x_BTD = self.attn_residual(x_BTD, h)
    ffn = self.moe.infer if hasattr(self, "moe") else self.mlp
    return self.mlp_residual(x_BTD, ffn(self.mlp_input(x_BTD))), cache_k, cache_v


def _stacked_blocks(cfg: ModelConfig, key: jax.Array, n: int, moe: bool,
                    context_parallel: str = "all_gather") -> Block:
  """One Block whose every parameter has a leading [n] axis, each layer initialised apart."""
  keys = jax.random.split(key, n)

  def one_layer(key):
    return nnx.state(Block(cfg, moe=moe, rngs=nnx.Rngs(params=key)))

  stacked = jax.vmap(one_layer)(keys)
  stacked = jax.tree.map(lambda p: p.replace(axes=("layers",) + tuple(p.axes)), stacked,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, moe=moe, rngs=nnx.Rngs(0),
                                                       context_parallel=context_parallel)))
  return nnx.merge(graphdef, stacked)


def _traverse(layout: LayerLayout, dense, moe, carry, dense_fn, moe_fn, wrap=lambda f: f,
              wrap_every: int = 1, by_index: bool = False):
  """Runs the layers in depth order over stacked params (`dense` `[Ld, ...]`, `moe`
  `[Lm, ...]`, either None when absent): `dense_fn(carry, params, depth) -> carry` and
  `moe_fn(carry, params, depth) -> (carry, stats)`, each wrapped by `wrap` (remat; with
  `wrap_every` N > 1 only every N-th dense layer is, scanned in groups of N). Returns
  (carry, the MoE layers' stats stacked `[Lm, ...]`, or None).

  `by_index` (inference): the dense layers are scanned by index over the whole stacks, their
  params `ops.stacked.LayerView`s, so that a product that can read a layer in place does."""
  plain_dense_fn = dense_fn
  dense_fn, moe_fn = wrap(dense_fn), wrap(moe_fn)
  f, G, m = layout.prefix, layout.groups, layout.group
  depths = jnp.asarray(layout.dense_depths())

  def scan_dense(carry, lo, hi):
    if hi <= lo:
      return carry
    if by_index and wrap_every == 1:
      return jax.lax.scan(lambda c, i: (dense_fn(c, stacked.views(dense, i), depths[i]), None),
                          carry, jnp.arange(lo, hi, dtype=jnp.int32))[0]
    xs = (jax.tree.map(lambda a: a[lo:hi], dense), depths[lo:hi])
    if wrap_every == 1:
      return jax.lax.scan(lambda c, x: (dense_fn(c, *x), None), carry, xs)[0]

    def group(c, g):  # one wrapped layer, then N - 1 plain ones
      c = dense_fn(c, *jax.tree.map(lambda a: a[0], g))
      rest = jax.tree.map(lambda a: a[1:], g)
      return jax.lax.scan(lambda c, x: (plain_dense_fn(c, *x), None), c, rest)[0], None
    groups = jax.tree.map(lambda a: a.reshape((-1, wrap_every) + a.shape[1:]), xs)
    return jax.lax.scan(group, carry, groups)[0]

  carry = scan_dense(carry, 0, f)
  stats = None
  if G:
    def group(carry, xs):
      dense_g, depths_g, moe_g, depth = xs
      if m > 1:
        carry = jax.lax.scan(lambda c, x: (dense_fn(c, *x), None), carry, (dense_g, depths_g))[0]
      return moe_fn(carry, moe_g, depth)

    lo, hi = f, f + G * (m - 1)
    dense_g = jax.tree.map(lambda a: a[lo:hi].reshape((G, m - 1) + a.shape[1:]), dense)
    xs = (dense_g, depths[lo:hi].reshape(G, m - 1), moe, jnp.asarray(layout.moe_depths()))
    carry, stats = jax.lax.scan(group, carry, xs)
  carry = scan_dense(carry, layout.n_dense - layout.suffix, layout.n_dense)
  return carry, stats


class Transformer(nnx.Module):
  """Token ids `[B, T]` -> logits `[B, T, V]` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, sequence_parallel: bool = False,
               context_parallel: str = "all_gather"):
    self.cfg = cfg
    self.layout = layer_layout(cfg)
    # How the residual stream between blocks is laid out on the mesh (training's forward).
    self.activation_axes = (rules.SEQUENCE_PARALLEL_AXES_BTD if sequence_parallel
                            else rules.ACTIVATION_AXES_BTD)
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
    if self.layout.n_dense:
      self.blocks = _stacked_blocks(cfg, rngs.params(), self.layout.n_dense, moe=False,
                                    context_parallel=context_parallel)
    if self.layout.groups:
      self.moe_blocks = _stacked_blocks(cfg, rngs.params(), self.layout.groups, moe=True,
                                        context_parallel=context_parallel)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, offset=cfg.norm_offset)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                           cfg.init_std, pd)

  def embed_tokens(self, tokens_BT):
    """Token ids `[B, T]` -> embeddings `[B, T, D]` in the compute dtype (times sqrt(D) in that
    dtype under `cfg.embed_scale`, as Gemma does)."""
    dtype = jnp.dtype(self.cfg.dtype)
    x_BTD = quant_matmul.lookup(self.embed[...], tokens_BT, dtype)
    if self.cfg.embed_scale:
      x_BTD = x_BTD * jnp.asarray(self.cfg.d_model ** 0.5, dtype)
    return x_BTD

  def _logits(self, x_BTD):
    norm_graphdef, head_params = self._head()
    return self._head_logits(x_BTD, norm_graphdef, head_params)

  def _head(self):
    """(graphdef of the final norm, head params: (its state, the output matrix))."""
    norm_graphdef, norm_state = nnx.split(self.final_norm)
    weight = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
    return norm_graphdef, (norm_state, weight)

  def _head_logits(self, x_BTD, norm_graphdef, head_params):
    """Final norm and output projection as a pure function of the head params: logits
    `[B, T, V]` float32 (tied: `[V, D]` embedding; else `[D, V]` lm_head)."""
    norm_state, weight = head_params
    x_BTD = nnx.merge(norm_graphdef, norm_state)(x_BTD)
    if self.cfg.tie_embeddings:
      logits = quant_matmul.project_rows(x_BTD, weight)
    else:
      logits = quant_matmul.project(x_BTD, weight, preferred_element_type=jnp.float32)
    cap = self.cfg.final_logit_soft_cap
    return cap * jnp.tanh(logits / cap) if cap else logits

  def pipeline_loss(self, tokens_BT: jax.Array, positions_BT: jax.Array,
                    segment_ids_BT: jax.Array | None, targets_BT: jax.Array,
                    weights_BT: jax.Array, loss_fn, *, microbatches: int):
    """Training loss of a dense model under the 1F1B pipeline schedule
    (`jaxllm.parallel.pipeline_1f1b`): (summed loss, (summed NLL, summed weight)).

    `loss_fn(logits_BTV, targets_BT, weights_BT) -> (loss, (nll, weight))` is applied by the
    last stage to each microbatch, so that its backward can start at once."""
    unit, units = self._dense_pipeline_units()
    norm_graphdef, head_params = self._head()

    def head(y, head_params, targets, weights):
      # Whole rows of logits: XLA's partitioner aborts on the loss's gather along a vocab split
      # over `tensor` inside the pipeline's shard_map (jax 0.10, CPU), so the split is undone.
      logits = self._head_logits(y, norm_graphdef, head_params)
      return loss_fn(rules.constrain(logits, ("batch", "length", None)), targets, weights)

    x_BTD = rules.constrain(self.embed_tokens(tokens_BT), self.activation_axes)
    return pipeline_1f1b.run(self._remat(unit), head, x_BTD, units, head_params, positions_BT,
                             segment_ids_BT, targets_BT, weights_BT, microbatches=microbatches)

  def _dense_pipeline_units(self):
    """(unit, stacked units) of a dense model's pipeline (GPipe, circular, 1F1B): a unit is one
    layer, `unit(x_BTD, params, positions_BT, segment_ids_BT) -> (x_BTD, None)`, whose params
    travel with its depth."""
    (dense_gd, dense), _ = self._stacks()
    axes = self.activation_axes

    def unit(x_BTD, p, positions_BT, segment_ids_BT):
      x_BTD, _ = nnx.merge(dense_gd, p["block"])(x_BTD, positions_BT, segment_ids_BT,
                                                 p["depth"])
      return rules.constrain(x_BTD, axes), None
    return unit, {"block": dense, "depth": jnp.asarray(self.layout.dense_depths())}

  def _remat(self, fn):
    if self.cfg.remat == "none":
      return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)

  def _stacks(self):
    """(graphdef, stacked params) of the dense and the MoE blocks, (None, None) when absent."""
    dense = nnx.split(self.blocks) if hasattr(self, "blocks") else (None, None)
    moe = nnx.split(self.moe_blocks) if hasattr(self, "moe_blocks") else (None, None)
    return dense, moe

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, microbatches: int = 1,
               pipeline_chunks: int = 1) -> jax.Array:
    """Full forward (evaluation, inference, reference): logits only (see `forward`)."""
    return self.forward(tokens_BT, positions_BT, segment_ids_BT, microbatches=microbatches,
                        pipeline_chunks=pipeline_chunks)[0]

  def forward(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
              segment_ids_BT: jax.Array | None = None, *, microbatches: int = 1,
              pipeline_chunks: int = 1) -> tuple[jax.Array, dict | None]:
    """Full forward (training): (logits `[B, T, V]`, the MoE layers' routing stats stacked
    `[Lm, ...]` (`jaxllm.model.moe`), None for a dense model). positions default to arange(T).

    Under a mesh whose `stage` axis is > 1 the layers run as a pipeline of `microbatches`
    microbatches, GPipe or (pipeline_chunks > 1) circular (`jaxllm.parallel.pipeline`); its
    units are the layers of a dense model or the `moe_every`-layer groups of an MoE model.
    """
    x_BTD, stats = self._trunk(tokens_BT, positions_BT, segment_ids_BT,
                               microbatches=microbatches, pipeline_chunks=pipeline_chunks)
    return rules.constrain(self._logits(x_BTD), rules.ACTIVATION_AXES_BTV), stats

  def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
             segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """(the final norm's output `[B, T, D]`, what the head reads, MoE routing stats): the
    features a reward model's scalar head takes (`jaxllm.train.reward`)."""
    x_BTD, stats = self._trunk(tokens_BT, positions_BT, segment_ids_BT)
    return self.final_norm(x_BTD), stats

  def logits_and_hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                        segment_ids_BT: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, dict | None]:
    """(logits `[B, T, V]` float32, the final norm's output `[B, T, D]`, MoE routing stats)
    of one pass: a policy's token distribution and the features of a value head on it
    (`jaxllm.rl.losses`)."""
    x_BTD, stats = self._trunk(tokens_BT, positions_BT, segment_ids_BT)
    logits = rules.constrain(self._logits(x_BTD), rules.ACTIVATION_AXES_BTV)
    return logits, self.final_norm(x_BTD), stats

  def _trunk(self, tokens_BT, positions_BT, segment_ids_BT, *, microbatches: int = 1,
             pipeline_chunks: int = 1) -> tuple[jax.Array, dict | None]:
    """The embedding and every layer: (the residual stream `[B, T, D]` before the final norm,
    routing stats)."""
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    (dense_gd, dense), (moe_gd, moe) = self._stacks()

    axes = self.activation_axes

    def dense_block(x_BTD, params, positions_BT, segment_ids_BT, depth=None):
      x_BTD, _ = nnx.merge(dense_gd, params)(x_BTD, positions_BT, segment_ids_BT, depth)
      return rules.constrain(x_BTD, axes)

    def moe_block(x_BTD, params, positions_BT, segment_ids_BT):
      x_BTD, stats = nnx.merge(moe_gd, params)(x_BTD, positions_BT, segment_ids_BT)
      return rules.constrain(x_BTD, axes), stats

    x_BTD = rules.constrain(self.embed_tokens(tokens_BT), axes)
    if pipeline.num_stages() > 1:
      if moe is None:
        unit, units = self._dense_pipeline_units()
      else:  # units: groups of (moe_every - 1) dense layers and one MoE layer
        m = self.layout.group

        def unit(x, p, pos, seg):
          if m > 1:
            x = jax.lax.scan(lambda h, lp: (dense_block(h, lp, pos, seg), None), x,
                             p["dense"])[0]
          return moe_block(x, p["moe"], pos, seg)
        G = self.layout.groups
        units = {"moe": moe, "dense": jax.tree.map(
            lambda a: a.reshape((G, m - 1) + a.shape[1:]), dense) if m > 1 else None}
      x_BTD, stats = pipeline.run(self._remat(unit), x_BTD, units, positions_BT,
                                  segment_ids_BT, microbatches=microbatches,
                                  chunks=pipeline_chunks)
    else:
      x_BTD, stats = _traverse(
          self.layout, dense, moe, x_BTD,
          lambda x, p, depth: dense_block(x, p, positions_BT, segment_ids_BT, depth),
          lambda x, p, _: moe_block(x, p, positions_BT, segment_ids_BT), self._remat,
          self.cfg.remat_every)
    return x_BTD, stats

  def extend(self, tokens_BT: jax.Array, cache: KVCache | PagedKVCache,
             num_new_B: jax.Array | None = None, *, last_only: bool = False,
             stream: Stream | None = None) -> tuple[jax.Array, KVCache | PagedKVCache]:
    """Runs T new tokens per sequence against the cache (prefill chunk: T > 1; decode: T = 1).

    Token t of sequence b goes to position cache.lengths[b] + t; only the first num_new_B[b]
    (default T) are real and stored, the rest is right padding, and lengths advance by num_new.
    Returns logits `[B, T, V]`, or with `last_only` `[B, 1, V]` at each sequence's last real
    token (the head is then computed once per sequence, not T times). `stream`: the cache is a
    StreamingLLM cache (sinks + recent window, `jaxllm.model.cache.Stream`).

    The whole `[L, ...]` cache rides in the scan carry and each layer scatters only its new
    tokens into it, so a step costs the new K/V, not a copy of the cache.
    """
    B, T = tokens_BT.shape
    (dense_gd, dense), (moe_gd, moe) = self._stacks()
    lengths_B = cache.lengths
    page_table = getattr(cache, "page_table", None)
    # Under a serving mesh the cache stays split over KV heads in and out of the step, so the
    # donated buffers are reused in place.
    hold = lambda x: placement.constrain_cache(x, paged=page_table is not None)

    def step(graphdef):
      def run(carry, params, depth):
        x_BTD, k, v = carry
        return nnx.merge(graphdef, params).extend(x_BTD, k, v, depth, lengths_B, num_new_B,
                                                  page_table, stream)
      return run

    moe_step = lambda carry, params, depth: (step(moe_gd)(carry, params, depth), None)
    (x_BTD, k, v), _ = _traverse(self.layout, dense, moe,
                                 (self.embed_tokens(tokens_BT), hold(cache.k), hold(cache.v)),
                                 step(dense_gd), moe_step, by_index=True)
    k, v = hold(k), hold(v)
    num_new_B = jnp.full((B,), T, jnp.int32) if num_new_B is None else num_new_B
    if last_only:
      last_B = jnp.clip(num_new_B - 1, 0, T - 1)
      x_BTD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
    return self._logits(x_BTD), cache._replace(k=k, v=v, lengths=lengths_B + num_new_B)


def create(cfg: ModelConfig, seed: int | jax.Array = 0, *, sequence_parallel: bool = False,
           context_parallel: str = "all_gather") -> Transformer:
  """A model with freshly initialised params; `sequence_parallel` and `context_parallel` only
  change how training lays out and attends (`mesh.sequence_parallel`,
  `train.context_parallel`). Under a `context` mesh axis with `context_parallel="ring"` the
  forward pass expects its tokens in `ops.ring_attention.load_balance_order`, as the train step
  (`train.step.load_balanced`) passes them."""
  key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
  return Transformer(cfg, rngs=nnx.Rngs(params=key), sequence_parallel=sequence_parallel,
                     context_parallel=context_parallel)


def split(model: Transformer):
  """`(graphdef, params)` with params a plain nested dict of arrays."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def abstract_params(cfg: ModelConfig, seed: int = 0, *, sequence_parallel: bool = False,
                    context_parallel: str = "all_gather"):
  """`(graphdef, params)` with ShapeDtypeStruct leaves; allocates nothing. The graphdef lays the
  residual stream out for `sequence_parallel` and attends by `context_parallel` (`create`)."""
  return split(nnx.eval_shape(lambda: create(cfg, seed, sequence_parallel=sequence_parallel,
                                             context_parallel=context_parallel)))


def logical_axes(cfg: ModelConfig) -> dict:
  """The params dict's structure with each leaf replaced by its tuple of logical axis names."""
  state = nnx.state(nnx.eval_shape(lambda: create(cfg)))
  axes = jax.tree.map(lambda p: tuple(p.axes), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return _to_plain(axes)


def _to_plain(tree):
  if hasattr(tree, "items"):
    return {k: _to_plain(v) for k, v in tree.items()}
  return tree
