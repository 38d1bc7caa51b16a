"""Contiguous KV cache: a plain pytree passed into and returned from jitted functions.

k, v: `[L, B, S, K, Dh]` (layers, batch, max_len, kv heads, head dim)
lengths: `[B]` int32, tokens already written per sequence; the next token goes to slot lengths[b].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
  shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def write(cache_BSKDh: jax.Array, new_BTKDh: jax.Array, starts_B: jax.Array) -> jax.Array:
  """Writes new_BTKDh[b] into cache_BSKDh[b, starts_B[b]:starts_B[b] + T].

  The caller guarantees starts + T <= S (dynamic_update_slice would otherwise clamp).
  """
  def one(c, n, s):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))
  return jax.vmap(one)(cache_BSKDh, new_BTKDh, starts_B)
