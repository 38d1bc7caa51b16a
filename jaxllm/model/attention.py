"""Attention block: Q/K/V projections, RoPE (or ALiBi slopes), optional cache update, output
projection.

Shapes: x `[B, T, D]`; q `[B, T, H, Dh]`; k, v `[B, T, K, Dh]`; per-layer cache `[B, S, K, Dh]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model import cache as kv_cache
from jaxllm.model import positions
from jaxllm.model.layers import RMSNorm, param
from jaxllm.model.positions import Rope, alibi_slopes
from jaxllm.ops import attention as attention_ops
from jaxllm.ops import cpu_attention
from jaxllm.ops.quant_matmul import project


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, context_parallel: str = "all_gather"):
    pd = jnp.dtype(cfg.param_dtype)
    self.context_parallel = context_parallel
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), cfg.init_std, pd)
    self.k = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    self.v = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg.init_std, pd)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.o = param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), out_std, pd)
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((H, Dh), pd), axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((K, Dh), pd), axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((K, Dh), pd), axes=("kv_heads", "head_dim"))
    offset = cfg.norm_offset
    if cfg.qk_norm and cfg.qk_norm_over_heads:  # OLMo 2: one norm across all heads
      self.q_norm = RMSNorm((H, Dh), cfg.norm_eps, pd, ("heads", "head_dim"), offset)
      self.k_norm = RMSNorm((K, Dh), cfg.norm_eps, pd, ("kv_heads", "head_dim"), offset)
    elif cfg.qk_norm:
      self.q_norm = RMSNorm(Dh, cfg.norm_eps, pd, "head_dim", offset)
      self.k_norm = RMSNorm(Dh, cfg.norm_eps, pd, "head_dim", offset)
    # Hashable host constants, not arrays: module attributes that are arrays would become graph
    # state.
    if cfg.position_encoding == "alibi":
      self.rope, self.slopes = None, tuple(float(m) for m in alibi_slopes(H))
    else:
      self.rope, self.slopes = Rope.from_config(cfg), None
    self.sliding_window = cfg.sliding_window or None
    # Local and global layers (Gemma 2/3): only the local ones have the window, so the
    # contiguous cache is a ring only when every layer has it.
    self.global_every = cfg.global_every
    self.cache_window = cfg.cache_window or None
    self.local_rope = None
    if cfg.rope_local_theta and self.rope is not None:
      self.local_rope = Rope(tuple(float(f) for f in positions.rope_inverse_frequencies(
          Dh, cfg.rope_local_theta)))
    # query_pre_attn_scalar: q is scaled by sqrt(Dh / scalar) so that every attention path's
    # 1 / sqrt(Dh) makes the model's 1 / sqrt(scalar).
    self.q_scale = (Dh / cfg.query_pre_attn_scalar) ** 0.5 if cfg.query_pre_attn_scalar else 1.0
    self.soft_cap = cfg.attn_logit_soft_cap
    self.impl = cfg.attention_impl

  @property
  def alibi_slopes(self) -> jax.Array | None:
    """`[H]` float32 ALiBi slopes, or None for a RoPE model."""
    return None if self.slopes is None else jnp.asarray(np.asarray(self.slopes, np.float32))

  def is_local(self, depth: jax.Array | int | None) -> jax.Array | None:
    """Whether layer `depth` attends within the window only (a traced bool), or None when every
    layer is alike (`cfg.global_every` 0)."""
    if not self.global_every or depth is None:
      return None
    return (jnp.asarray(depth) + 1) % self.global_every != 0

  def _windowed(self, attend, local):
    """`attend(window)` with this layer's window: the local layers' one or None. A traced
    `local` picks one of the two calls with `lax.cond` (the kernels take static windows)."""
    if local is None:
      return attend(self.sliding_window)
    return jax.lax.cond(local, lambda: attend(self.sliding_window), lambda: attend(None))

  def _rotate(self, x_BTNDh, positions_BT, seq_len_B, local):
    """q or k `[B, T, N, Dh]` rotated by this layer's RoPE (the local one on local layers)."""
    out = self.rope.apply(x_BTNDh, positions_BT, seq_len_B)
    if local is None or self.local_rope is None:
      return out
    return jnp.where(local, self.local_rope.apply(x_BTNDh, positions_BT, seq_len_B), out)

  def _project(self, x_BTD, positions_BT, seq_len_B, *, rotate: bool = True, local=None):
    q = project(x_BTD, self.q[...])  # [B, T, H, Dh]
    k = project(x_BTD, self.k[...])  # [B, T, K, Dh]
    v = project(x_BTD, self.v[...])
    if hasattr(self, "q_bias"):
      q = q + self.q_bias[...].astype(q.dtype)[None, None]
      k = k + self.k_bias[...].astype(k.dtype)[None, None]
      v = v + self.v_bias[...].astype(v.dtype)[None, None]
    if hasattr(self, "q_norm"):
      q, k = self.q_norm(q), self.k_norm(k)
    if self.q_scale != 1.0:
      q = q * jnp.asarray(self.q_scale, q.dtype)
    if self.rope is None or not rotate:
      return q, k, v
    return (self._rotate(q, positions_BT, seq_len_B, local),
            self._rotate(k, positions_BT, seq_len_B, local), v)

  def out_projection(self, attn_BTHDh):
    """`[B, T, H, Dh]` attention outputs -> `[B, T, D]`."""
    return project(attn_BTHDh, self.o[...], in_axes=2)  # [B, T, D]

  def attend(self, x_BTD: jax.Array, positions_BT: jax.Array,
             segment_ids_BT: jax.Array | None, depth: jax.Array | int | None = None
             ) -> jax.Array:
    """Self-attention before the output projection, `[B, T, H, Dh]`; `depth` (the layer's
    index) matters only to models with local and global layers."""
    local = self.is_local(depth)
    q, k, v = self._project(x_BTD, positions_BT, jnp.max(positions_BT, axis=1) + 1, local=local)
    # Masking by position: the same as by index within a packed segment, and it survives the
    # sequence reordering of ring context parallelism. Under ring the tokens come in the load-
    # balanced order (the train step's `load_balanced`), which lets the ring run the kernel.
    ring = self.context_parallel == "ring"
    return self._windowed(lambda window: attention_ops.self_attention(
        q, k, v, segment_ids=segment_ids_BT, sliding_window=window, impl=self.impl,
        alibi_slopes=self.alibi_slopes, index=positions_BT,
        context_parallel=self.context_parallel, load_balanced=ring,
        logit_soft_cap=self.soft_cap), local)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               segment_ids_BT: jax.Array | None, depth: jax.Array | int | None = None
               ) -> jax.Array:
    """Self-attention over the T tokens of x (training / full forward)."""
    return self.out_projection(self.attend(x_BTD, positions_BT, segment_ids_BT, depth))

  def extend(self, x_BTD: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array,
             lengths_B: jax.Array, num_new_B: jax.Array | None = None,
             page_table_BM: jax.Array | None = None, stream: kv_cache.Stream | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attends T new tokens per sequence, stored at positions lengths[b] .. lengths[b] + T - 1.

    cache_k/v: all layers' contiguous cache `[L, B, S, K, Dh]`, or all layers' page pools
    `[L, N, P, K, Dh]` when `page_table_BM` is given; this block is layer `layer`. Only the
    first num_new_B[b] tokens are stored (right padding is dropped); the outputs of the
    padding tokens are meaningless. `stream`: a StreamingLLM cache (`_extend_stream`).
    """
    if stream is not None:
      return self._extend_stream(x_BTD, cache_k, cache_v, layer, lengths_B, num_new_B, stream,
                                 page_table_BM)
    B, T, _ = x_BTD.shape
    local = self.is_local(layer)
    q_index_BT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    seq_len_B = lengths_B + (T if num_new_B is None else num_new_B)
    q, k, v = self._project(x_BTD, q_index_BT, seq_len_B, local=local)
    if page_table_BM is not None:
      cache_k = kv_cache.write_paged(cache_k, layer, k, page_table_BM, lengths_B, num_new_B)
      cache_v = kv_cache.write_paged(cache_v, layer, v, page_table_BM, lengths_B, num_new_B)
      int8 = isinstance(cache_k, kv_cache.Int8KV)
      values = cache_k.values if int8 else cache_k
      if cpu_attention.paged_applies(q, values, alibi_slopes=self.alibi_slopes,
                                     logit_soft_cap=self.soft_cap):
        # Reads the layer's pages in place through the table (no gathered copy of them).
        scales = dict(k_scales_LNPK=cache_k.scales, v_scales_LNPK=cache_v.scales) if int8 else {}
        out = self._windowed(lambda window: cpu_attention.paged_attention(
            q, values, cache_v.values if int8 else cache_v, layer, page_table_BM,
            q_index_BT=q_index_BT, sliding_window=window, **scales), local)
        return self.out_projection(out), cache_k, cache_v
      # Layer l's pages are pages l*N .. of the flattened pool: no per-layer copy of the pool.
      L, N = cache_k.shape[:2]
      flat = lambda pages: pages.reshape(L * N, *pages.shape[2:])
      scales = {}
      k_pages, v_pages = flat(cache_k), flat(cache_v)
      if isinstance(cache_k, kv_cache.Int8KV):
        scales = dict(k_scales=k_pages.scales, v_scales=v_pages.scales)
        k_pages, v_pages = k_pages.values, v_pages.values
      out = self._windowed(lambda window: attention_ops.paged_attention(
          q, k_pages, v_pages, lengths_B + T, page_table_BM + layer * N, sliding_window=window,
          impl=self.impl, alibi_slopes=self.alibi_slopes, logit_soft_cap=self.soft_cap,
          **scales), local)
      return self.out_projection(out), cache_k, cache_v
    S = cache_k.shape[2]
    # A windowed model's contiguous cache is a ring (a cache as long as the sequence is one
    # that never wraps); masking then goes by the position each slot holds.
    ring = self.cache_window is not None
    cache_k = kv_cache.write(cache_k, layer, k, lengths_B, num_new_B, ring=ring)
    cache_v = kv_cache.write(cache_v, layer, v, lengths_B, num_new_B, ring=ring)
    if ring:
      kv_index_BS = kv_cache.ring_positions(lengths_B + T, S)
    else:
      kv_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    if cpu_attention.applies(q, cache_k, alibi_slopes=self.alibi_slopes,
                             logit_soft_cap=self.soft_cap):
      # Reads the layer in place (no copy of it out of the cache), one pass over the positions.
      out = self._windowed(lambda window: cpu_attention.attention(
          q, cache_k, cache_v, layer, q_index_BT=q_index_BT, kv_index_BS=kv_index_BS,
          sliding_window=window), local)
      return self.out_projection(out), cache_k, cache_v
    keys = kv_cache.read(cache_k, layer, q.dtype)
    values = kv_cache.read(cache_v, layer, q.dtype)
    out = self._windowed(lambda window: attention_ops.attention(
        q, keys, values, q_index=q_index_BT, kv_index=kv_index_BS, sliding_window=window,
        alibi_slopes=self.alibi_slopes, logit_soft_cap=self.soft_cap), local)
    return self.out_projection(out), cache_k, cache_v

  def _extend_stream(self, x_BTD, cache_k, cache_v, layer, lengths_B, num_new_B,
                     stream: kv_cache.Stream, page_table_BM=None):
    """StreamingLLM: the T new tokens see the `stream.sinks` first tokens and the
    `stream.window` most recent, at positions within the cache.

    Keys are cached before RoPE and rotated at every step: a token's position is its place in
    the cache (sinks 0 .. sinks-1, then the window in order), shifted by how far the window has
    slid past the sinks, so positions stay below sinks + window + T however long generation
    runs. Keys the step's first query no longer sees are hidden (their slot may still hold
    them until the ring overwrites it). Paged (`page_table_BM`): each sequence's S = M * P
    slots are those of its M pages, read back as one contiguous view.
    """
    if self.global_every or self.soft_cap:  # callers check first (`generate.check_stream`)
      raise ValueError("streaming generation (sink_tokens / stream_window) does not support "
                       "models with local and global layers or soft-capped attention yet")
    B, T, _ = x_BTD.shape
    sinks = stream.sinks
    window = min(stream.window, self.sliding_window or stream.window)
    pos_BT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    q, k, v = self._project(x_BTD, None, None, rotate=False)
    if page_table_BM is None:
      S = cache_k.shape[2]
      slot_BT = kv_cache.stream_slots(pos_BT, sinks, S)
      cache_k = kv_cache.write_slots(cache_k, layer, k, slot_BT, num_new_B)
      cache_v = kv_cache.write_slots(cache_v, layer, v, slot_BT, num_new_B)
      keys = kv_cache.read(cache_k, layer, q.dtype)
      values = kv_cache.read(cache_v, layer, q.dtype)
    else:
      S = page_table_BM.shape[1] * cache_k.shape[2]
      slot_BT = kv_cache.stream_slots(pos_BT, sinks, S)
      cache_k = kv_cache.write_paged_slots(cache_k, layer, k, page_table_BM, slot_BT, num_new_B)
      cache_v = kv_cache.write_paged_slots(cache_v, layer, v, page_table_BM, slot_BT, num_new_B)
      keys = kv_cache.read_paged(cache_k, layer, page_table_BM, q.dtype)
      values = kv_cache.read_paged(cache_v, layer, page_table_BM, q.dtype)
    held_BS = kv_cache.stream_positions(lengths_B + T, sinks, S)
    first_B = lengths_B - window + 1  # the oldest key the first new query sees
    shift_B = jnp.maximum(first_B - sinks, 0)
    kept_BS = (held_BS >= first_B[:, None]) & (held_BS != kv_cache.EMPTY_POSITION)
    kv_index_BS = jnp.where(held_BS < sinks, held_BS,
                            jnp.where(kept_BS, held_BS - shift_B[:, None],
                                      kv_cache.EMPTY_POSITION))
    q_index_BT = pos_BT - shift_B[:, None]
    if self.rope is not None:
      seq_len_B = lengths_B + (T if num_new_B is None else num_new_B) - shift_B
      keys = self.rope.apply(keys, jnp.minimum(kv_index_BS, S + T), seq_len_B)
      q = self.rope.apply(q, q_index_BT, seq_len_B)
    out = attention_ops.attention(q, keys, values, q_index=q_index_BT, kv_index=kv_index_BS,
                                  sliding_window=window, sinks=sinks,
                                  alibi_slopes=self.alibi_slopes)
    return self.out_projection(out), cache_k, cache_v
