"""A decode step's attention on XLA:CPU: the new tokens' queries against a contiguous or paged
cache.

XLA:CPU turns a decode step's attention (`jaxllm.ops.attention.attention` for T = 1 against
S cached keys) into two batched dots with a transpose before each, the mask and a softmax as
separate loops: about 50 us a layer for SmolLM2-135M at S = 128, ten times the arithmetic, a
tenth of a quantized decode step. The CPU kernel library (`cpu_gemv.cc`, built and registered
by `jaxllm.ops.cpu_gemv`) has a handler doing it in one pass over the cached positions (then
one over the values), reading layer `layer` of the stacked cache in place; same masking rules,
same finite mask value.

`paged_attention` does the same over a layer's page pool through the page table, float32 or
int8 pages with their scales, where XLA's path gathers each sequence's pages into a contiguous
copy first (`jaxllm.ops.attention.gather_pages`): for SmolLM2 at batch 8 and a table of 512
positions that copy made the engine's decode step 1.5x slower (78.6 against 51.0 ms,
docs/quantization.md). A sequence's pages are read only up to its last query's position.

Inference only (no gradient); float32 queries and (but for int8 pages) cache; no ALiBi or
logit soft cap (those keep XLA's path). Taken under the same `cpu_gemv.cpu_kernel` mode as the
products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops import cpu_gemv

# The most new tokens per sequence for which the kernel runs. It computes each query's dot
# products on its own, where XLA's batched dot shares the work between queries: measured per
# layer at S = 128 (SmolLM2 shapes, docs/quantization.md), kernel vs XLA 19 vs 48 us at T = 1, 32 vs 56 at
# T = 2, 66 vs 85 at T = 5 (a speculative verify step of k = 4), 111 vs 92 at T = 8.
MAX_QUERIES = 5


def applies(q_BTHDh: jax.Array, cache_k, *, alibi_slopes=None,
            logit_soft_cap: float = 0.0) -> bool:
  """Whether `attention` serves these queries and this cache (`[L, B, S, K, Dh]` array)."""
  return (isinstance(cache_k, jax.Array) and cache_k.ndim == 5
          and q_BTHDh.dtype == jnp.float32 and cache_k.dtype == jnp.float32
          and q_BTHDh.shape[1] <= MAX_QUERIES and alibi_slopes is None
          and not logit_soft_cap and cpu_gemv.enabled())


def attention(q_BTHDh: jax.Array, cache_k_LBSKDh: jax.Array, cache_v_LBSKDh: jax.Array,
              layer: jax.Array | int, *, q_index_BT: jax.Array, kv_index_BS: jax.Array,
              sliding_window: int | None = None, sm_scale: float | None = None) -> jax.Array:
  """Causal attention of q `[B, T, H, Dh]` over layer `layer` of the stacked cache, by token
  index (q_index `[B, T]`, kv_index `[B, S]` int32) -> `[B, T, H, Dh]` float32; equal to
  `jaxllm.ops.attention.attention` on that layer's keys and values."""
  Dh = q_BTHDh.shape[-1]
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  call = jax.ffi.ffi_call(cpu_gemv.ATTENTION_TARGET,
                          jax.ShapeDtypeStruct(q_BTHDh.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q_BTHDh, cache_k_LBSKDh, cache_v_LBSKDh, jnp.asarray(layer, jnp.int32),
              q_index_BT.astype(jnp.int32), kv_index_BS.astype(jnp.int32),
              window=np.int64(sliding_window or 0), scale=np.float32(scale))


def paged_applies(q_BTHDh: jax.Array, pages_LNPKDh, *, alibi_slopes=None,
                  logit_soft_cap: float = 0.0) -> bool:
  """Whether `paged_attention` serves these queries and page pool (`[L, N, P, K, Dh]` float32
  or int8 values)."""
  return (isinstance(pages_LNPKDh, jax.Array) and pages_LNPKDh.ndim == 5
          and pages_LNPKDh.dtype in (jnp.float32, jnp.int8) and q_BTHDh.dtype == jnp.float32
          and q_BTHDh.shape[1] <= MAX_QUERIES and alibi_slopes is None
          and not logit_soft_cap and cpu_gemv.enabled())


def paged_attention(q_BTHDh: jax.Array, k_LNPKDh: jax.Array, v_LNPKDh: jax.Array,
                    layer: jax.Array | int, page_table_BM: jax.Array, *, q_index_BT: jax.Array,
                    k_scales_LNPK: jax.Array | None = None,
                    v_scales_LNPK: jax.Array | None = None,
                    sliding_window: int | None = None, sm_scale: float | None = None
                    ) -> jax.Array:
  """Causal attention of q `[B, T, H, Dh]` (token positions q_index `[B, T]`) over layer
  `layer` of the page pools `[L, N, P, K, Dh]` (float32, or int8 with `[L, N, P, K]` scales):
  position i of sequence b is row i % P of page page_table_BM[b, i // P] -> `[B, T, H, Dh]`
  float32; equal to `jaxllm.ops.attention.paged_attention` on that layer."""
  Dh = q_BTHDh.shape[-1]
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  empty = jnp.zeros((0,), jnp.float32)
  call = jax.ffi.ffi_call(cpu_gemv.PAGED_ATTENTION_TARGET,
                          jax.ShapeDtypeStruct(q_BTHDh.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q_BTHDh, k_LNPKDh, v_LNPKDh,
              empty if k_scales_LNPK is None else k_scales_LNPK,
              empty if v_scales_LNPK is None else v_scales_LNPK,
              jnp.asarray(layer, jnp.int32), page_table_BM.astype(jnp.int32),
              q_index_BT.astype(jnp.int32), window=np.int64(sliding_window or 0),
              scale=np.float32(scale))
