"""A decode step's attention on XLA:CPU: the new tokens' queries against a contiguous cache.

XLA:CPU turns a decode step's attention (`jaxllm.ops.attention.attention` for T = 1 against
S cached keys) into two batched dots with a transpose before each, the mask and a softmax as
separate loops: about 50 us a layer for SmolLM2-135M at S = 128, ten times the arithmetic, a
tenth of a quantized decode step. The CPU kernel library (`cpu_gemv.cc`, built and registered
by `jaxllm.ops.cpu_gemv`) has a handler doing it in one pass over the cached positions (then
one over the values), reading layer `layer` of the stacked cache in place; same masking rules,
same finite mask value.

Inference only (no gradient); float32 queries and cache; no ALiBi or logit soft cap (those
keep XLA's path). Taken under the same `cpu_gemv.cpu_kernel` mode as the products.
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
