"""Llama-style decoder-only transformer with stacked, scanned layers.

Shape letters: B batch, T query length, S cache length, D d_model, H query heads, K kv heads,
Dh head dim, F mlp width, V vocab, L layers.

All `n_layers` blocks live in one `Block` module whose parameters carry a leading `[L]` axis
(logical axis `layers`); the forward pass runs them with `jax.lax.scan`, so compile time and
program size do not grow with depth. Master parameters stay in `param_dtype`; activations and
matmuls run in `dtype`; norms, softmax and logits are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.inference.kv_cache import KVCache, PagedKVCache
from jaxllm.model.attention import Attention
from jaxllm.model.layers import RMSNorm, param
from jaxllm.model.mlp import MLP
from jaxllm.parallel import pipeline, rules

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))

  def extend(self, x_BTD, cache_k, cache_v, layer, lengths_B, num_new_B, page_table_BM):
    h, cache_k, cache_v = self.attn.extend(self.attn_norm(x_BTD), cache_k, cache_v, layer,
                                           lengths_B, num_new_B, page_table_BM)
    x_BTD = x_BTD + h
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache_k, cache_v


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose every parameter has a leading [L] axis, each layer initialised apart."""
  keys = jax.random.split(rngs.params(), cfg.n_layers)

  def one_layer(key):
    return nnx.state(Block(cfg, rngs=nnx.Rngs(params=key)))

  stacked = jax.vmap(one_layer)(keys)
  stacked = jax.tree.map(lambda p: p.replace(axes=("layers",) + tuple(p.axes)), stacked,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
  """Token ids `[B, T]` -> logits `[B, T, V]` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
    self.blocks = _stacked_blocks(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                           cfg.init_std, pd)

  def _embed(self, tokens_BT):
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))

  def _logits(self, x_BTD):
    x_BTD = self.final_norm(x_BTD)
    if self.cfg.tie_embeddings:
      return jnp.einsum("btd,vd->btv", x_BTD, self.embed[...].astype(x_BTD.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", x_BTD, self.lm_head[...].astype(x_BTD.dtype),
                      preferred_element_type=jnp.float32)

  def _remat(self, fn):
    if self.cfg.remat == "none":
      return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, microbatches: int = 1,
               pipeline_chunks: int = 1) -> jax.Array:
    """Full forward (training, evaluation, reference). positions default to arange(T).

    Under a mesh whose `stage` axis is > 1 the layers run as a pipeline of `microbatches`
    microbatches, GPipe or (pipeline_chunks > 1) circular (`jaxllm.parallel.pipeline`);
    otherwise both are ignored.
    """
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    graphdef, stacked = nnx.split(self.blocks)

    def block(x_BTD, layer_params, positions_BT, segment_ids_BT):
      return nnx.merge(graphdef, layer_params)(x_BTD, positions_BT, segment_ids_BT)

    x_BTD = rules.constrain(self._embed(tokens_BT), rules.ACTIVATION_AXES_BTD)
    if pipeline.num_stages() > 1:
      x_BTD = pipeline.run(self._remat(block), x_BTD, stacked, positions_BT, segment_ids_BT,
                           microbatches=microbatches, chunks=pipeline_chunks)
    else:
      def layer(x_BTD, layer_params):
        x_BTD = block(x_BTD, layer_params, positions_BT, segment_ids_BT)
        return rules.constrain(x_BTD, rules.ACTIVATION_AXES_BTD), None
      x_BTD, _ = jax.lax.scan(self._remat(layer), x_BTD, stacked)
    return rules.constrain(self._logits(x_BTD), rules.ACTIVATION_AXES_BTV)

  def extend(self, tokens_BT: jax.Array, cache: KVCache | PagedKVCache,
             num_new_B: jax.Array | None = None, *, last_only: bool = False
             ) -> tuple[jax.Array, KVCache | PagedKVCache]:
    """Runs T new tokens per sequence against the cache (prefill chunk: T > 1; decode: T = 1).

    Token t of sequence b goes to position cache.lengths[b] + t; only the first num_new_B[b]
    (default T) are real and stored, the rest is right padding, and lengths advance by num_new.
    Returns logits `[B, T, V]`, or with `last_only` `[B, 1, V]` at each sequence's last real
    token (the head is then computed once per sequence, not T times).

    The whole `[L, ...]` cache rides in the scan carry and each layer scatters only its new
    tokens into it, so a step costs the new K/V, not a copy of the cache.
    """
    B, T = tokens_BT.shape
    graphdef, stacked = nnx.split(self.blocks)
    lengths_B = cache.lengths
    page_table = getattr(cache, "page_table", None)

    def layer(carry, xs):
      x_BTD, k, v = carry
      layer_params, index = xs
      x_BTD, k, v = nnx.merge(graphdef, layer_params).extend(x_BTD, k, v, index, lengths_B,
                                                             num_new_B, page_table)
      return (x_BTD, k, v), None

    (x_BTD, k, v), _ = jax.lax.scan(layer, (self._embed(tokens_BT), cache.k, cache.v),
                                    (stacked, jnp.arange(self.cfg.n_layers, dtype=jnp.int32)))
    num_new_B = jnp.full((B,), T, jnp.int32) if num_new_B is None else num_new_B
    if last_only:
      last_B = jnp.clip(num_new_B - 1, 0, T - 1)
      x_BTD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
    return self._logits(x_BTD), cache._replace(k=k, v=v, lengths=lengths_B + num_new_B)


def create(cfg: ModelConfig, seed: int | jax.Array = 0) -> Transformer:
  key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
  return Transformer(cfg, rngs=nnx.Rngs(params=key))


def split(model: Transformer):
  """`(graphdef, params)` with params a plain nested dict of arrays."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def abstract_params(cfg: ModelConfig, seed: int = 0):
  """`(graphdef, params)` with ShapeDtypeStruct leaves; allocates nothing."""
  return split(nnx.eval_shape(lambda: create(cfg, seed)))


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
