"""Attention block: Q/K/V projections, RoPE, optional cache update, output projection.

Shapes: x `[B, T, D]`; q `[B, T, H, Dh]`; k, v `[B, T, K, Dh]`; per-layer cache `[B, S, K, Dh]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.inference import kv_cache
from jaxllm.model.layers import param
from jaxllm.model.positions import apply_rope, scaled_inverse_frequencies
from jaxllm.ops import attention as attention_ops


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.k = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.v = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.o = param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), out_std, pd)
    # A tuple, not an array: module attributes that are arrays would become graph state.
    self.inv_freq = tuple(float(f) for f in scaled_inverse_frequencies(cfg))
    self.sliding_window = cfg.sliding_window or None
    self.impl = cfg.attention_impl

  def _project(self, x_BTD, positions_BT):
    dt = x_BTD.dtype
    q = jnp.einsum("btd,dhk->bthk", x_BTD, self.q[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x_BTD, self.k[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x_BTD, self.v[...].astype(dt))
    inv_freq = np.asarray(self.inv_freq, np.float32)
    return apply_rope(q, positions_BT, inv_freq), apply_rope(k, positions_BT, inv_freq), v

  def _out(self, attn_BTHDh):
    return jnp.einsum("bthk,hkd->btd", attn_BTHDh, self.o[...].astype(attn_BTHDh.dtype))

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               segment_ids_BT: jax.Array | None) -> jax.Array:
    """Self-attention over the T tokens of x (training / full forward)."""
    q, k, v = self._project(x_BTD, positions_BT)
    out = attention_ops.self_attention(q, k, v, segment_ids=segment_ids_BT,
                                       sliding_window=self.sliding_window, impl=self.impl)
    return self._out(out)

  def extend(self, x_BTD: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array,
             lengths_B: jax.Array, num_new_B: jax.Array | None = None,
             page_table_BM: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attends T new tokens per sequence, stored at positions lengths[b] .. lengths[b] + T - 1.

    cache_k/v: all layers' contiguous cache `[L, B, S, K, Dh]`, or all layers' page pools
    `[L, N, P, K, Dh]` when `page_table_BM` is given; this block is layer `layer`. Only the
    first num_new_B[b] tokens are stored (right padding is dropped); the outputs of the
    padding tokens are meaningless.
    """
    B, T, _ = x_BTD.shape
    q_index_BT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    q, k, v = self._project(x_BTD, q_index_BT)
    if page_table_BM is not None:
      cache_k = kv_cache.write_paged(cache_k, layer, k, page_table_BM, lengths_B, num_new_B)
      cache_v = kv_cache.write_paged(cache_v, layer, v, page_table_BM, lengths_B, num_new_B)
      # Layer l's pages are pages l*N .. of the flattened pool: no per-layer copy of the pool.
      L, N = cache_k.shape[:2]
      flat = lambda pages: pages.reshape(L * N, *pages.shape[2:])
      out = attention_ops.paged_attention(q, flat(cache_k), flat(cache_v), lengths_B + T,
                                          page_table_BM + layer * N,
                                          sliding_window=self.sliding_window, impl=self.impl)
      return self._out(out), cache_k, cache_v
    S = cache_k.shape[2]
    cache_k = kv_cache.write(cache_k, layer, k, lengths_B, num_new_B)
    cache_v = kv_cache.write(cache_v, layer, v, lengths_B, num_new_B)
    kv_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    out = attention_ops.attention(q, cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype),
                                  q_index=q_index_BT, kv_index=kv_index_BS,
                                  sliding_window=self.sliding_window)
    return self._out(out), cache_k, cache_v
