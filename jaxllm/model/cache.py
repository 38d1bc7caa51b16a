"""KV caches: plain pytrees passed into and returned from the model's jitted steps.

Contiguous, `KVCache`:
  k, v: `[L, B, S, K, Dh]` (layers, batch, max_len, kv heads, head dim)
  lengths: `[B]` int32, tokens cached per sequence; the next token goes to slot lengths[b].

Paged, `PagedKVCache` (vLLM-style):
  k, v: `[L, N, P, K, Dh]`, a pool of N pages of P tokens per layer
  page_table: `[B, max_pages]` int32, slot i of sequence b lives in page page_table[b, i // P]
  lengths: `[B]` int32 as above.
Which pages a sequence owns is host-side bookkeeping (`jaxllm.inference.paging`); the device
only sees the table. Table entries past a sequence's length may name any page: they are never
read, and writes there are dropped (`write`/`write_paged` only store the `num_new` valid
tokens).

With dtype int8 each of k, v is an `Int8KV` (int8 values, a float32 scale per token and head),
in either layout; `read` and the paged attention kernels dequantize.

Rolling back (speculative decoding) is setting `lengths` lower: slots past the length are
overwritten before any query can see them, because attention masks by slot index.

Ring buffers (sliding-window models, contiguous layout): token p lives in slot p % S, so a cache
of `ring_len(window, T)` slots serves any length; `ring_positions` says which token each slot
holds. A step of T tokens overwrites the T oldest slots, so S >= window + T - 1 keeps every key
the step's first query still sees (rolling back k speculated tokens likewise needs T = k + 1).

Streaming (StreamingLLM, `Stream`): slots [0, sinks) keep the first tokens for good, the rest is
a ring for the most recent ones (`stream_slots`, `stream_positions`). Keys are stored before
RoPE, because their positions are those within the cache, which move as the window slides. In
the paged layout a streaming sequence owns a fixed set of pages whose slots play the same
roles (slot i in page page_table[b, i // P]), so its memory stays constant too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.ops.attention import gather_pages


class Int8KV(NamedTuple):
  """An int8 cache array with a float32 scale per token and head: K/V = values * scales.

  values `[L, B, S, K, Dh]` (contiguous) or `[L, N, P, K, Dh]` (pages) int8; scales the same
  without Dh. Symmetric, scale = max|x| / 127 over the head dim of each token: a token's keys
  keep their own range, so an outlier token costs no other token precision.
  """
  values: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def dtype(self):
    return self.values.dtype

  def reshape(self, *shape):
    """Reshape of the leading axes (the trailing [K, Dh] / [K] stay)."""
    lead = shape[:-2]
    return Int8KV(self.values.reshape(*lead, *self.values.shape[-2:]),
                  self.scales.reshape(*lead, self.scales.shape[-1]))


def zeros(shape: tuple[int, ...], dtype) -> jax.Array | Int8KV:
  """A zeroed cache array `[..., K, Dh]`; dtype int8 gives an `Int8KV`."""
  if jnp.dtype(dtype) == jnp.int8:
    return Int8KV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))
  return jnp.zeros(shape, dtype)


def quantize_kv(x_BTKDh: jax.Array) -> tuple[jax.Array, jax.Array]:
  """-> (int8 values, float32 scales `[B, T, K]`), one scale per token and head."""
  x = x_BTKDh.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def read(cache_L, layer, dtype) -> jax.Array:
  """Layer `layer` of a contiguous cache, `[B, S, K, Dh]` in `dtype` (dequantized if int8)."""
  if isinstance(cache_L, Int8KV):
    return (cache_L.values[layer].astype(jnp.float32)
            * cache_L.scales[layer][..., None]).astype(dtype)
  return cache_L[layer].astype(dtype)


def _set(cache_L, index, new_BTKDh):
  if isinstance(cache_L, Int8KV):
    values, scales = quantize_kv(new_BTKDh)
    return Int8KV(cache_L.values.at[index].set(values, mode="drop"),
                  cache_L.scales.at[index].set(scales, mode="drop"))
  return cache_L.at[index].set(new_BTKDh.astype(cache_L.dtype), mode="drop")


class KVCache(NamedTuple):
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


class PagedKVCache(NamedTuple):
  k: jax.Array
  v: jax.Array
  page_table: jax.Array
  lengths: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[2]

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size


def init_cache(n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
  shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
  return KVCache(zeros(shape, dtype), zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def init_paged_cache(n_layers: int, num_pages: int, page_size: int, n_kv_heads: int,
                     head_dim: int, page_table, lengths=None, dtype=jnp.float32) -> PagedKVCache:
  """A pool of `num_pages` zeroed pages per layer; `page_table` `[B, max_pages]` (host or device)."""
  shape = (n_layers, num_pages, page_size, n_kv_heads, head_dim)
  page_table = jnp.asarray(page_table, jnp.int32)
  if lengths is None:
    lengths = jnp.zeros((page_table.shape[0],), jnp.int32)
  return PagedKVCache(zeros(shape, dtype), zeros(shape, dtype), page_table,
                      jnp.asarray(lengths, jnp.int32))


def with_lengths(cache, lengths_B: jax.Array):
  """The same cache with other lengths (rollback, or sequences that took no tokens)."""
  return cache._replace(lengths=lengths_B.astype(jnp.int32))


class Stream(NamedTuple):
  """StreamingLLM generation: every query attends to the first `sinks` tokens and the `window`
  most recent ones (itself included), at their positions within the cache."""
  sinks: int
  window: int

  def cache_len(self, longest_step: int) -> int:
    """Slots a streaming cache needs when a step adds up to `longest_step` tokens."""
    return self.sinks + ring_len(self.window, longest_step)


def ring_len(window: int, longest_step: int) -> int:
  """Slots a ring-buffer cache needs for a `window`-token attention window when a step adds up
  to `longest_step` tokens."""
  return window + longest_step - 1


# The position of a slot that holds no token yet: past every query, so causal masking hides it.
EMPTY_POSITION = 2 ** 30


def ring_positions(ends_B: jax.Array, S: int) -> jax.Array:
  """`[B, S]` int32: the token position each ring slot holds once sequence b has `ends_B[b]`
  tokens written (the newest p < end with p % S == slot), EMPTY_POSITION where none is: a
  streaming cache without sinks."""
  return stream_positions(ends_B, 0, S)


def stream_slots(pos_BT: jax.Array, sinks: int, S: int) -> jax.Array:
  """The slot of each token position in a streaming cache of S slots."""
  return jnp.where(pos_BT < sinks, pos_BT, sinks + (pos_BT - sinks) % (S - sinks))


def stream_positions(ends_B: jax.Array, sinks: int, S: int) -> jax.Array:
  """`[B, S]` int32: the token position each slot of a streaming cache holds once sequence b
  has `ends_B[b]` tokens written, EMPTY_POSITION where none is."""
  R = S - sinks
  slot_S = jnp.arange(S, dtype=jnp.int32)[None, :]
  last_BS = ends_B[:, None] - 1 - slot_S
  pos_BS = jnp.where(slot_S < sinks, slot_S, slot_S + R * jnp.floor_divide(last_BS, R))
  return jnp.where(last_BS >= 0, pos_BS, EMPTY_POSITION).astype(jnp.int32)


def _valid_BT(B: int, T: int, num_new_B: jax.Array | None) -> jax.Array:
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  return jnp.ones((B, T), bool) if num_new_B is None else t < num_new_B[:, None]


def write(cache_LBSKDh: jax.Array | Int8KV, layer: jax.Array | int, new_BTKDh: jax.Array,
          starts_B: jax.Array, num_new_B: jax.Array | None = None, *,
          ring: bool = False) -> jax.Array:
  """Stores new_BTKDh[b, t] at layer `layer`, slot starts_B[b] + t (modulo S for a `ring`),
  for t < num_new_B[b].

  Tokens past num_new (right padding) and slots past the end are dropped, never clamped onto
  valid slots.
  """
  T = new_BTKDh.shape[1]
  slot_BT = starts_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  if ring:
    slot_BT = slot_BT % cache_LBSKDh.shape[2]
  return write_slots(cache_LBSKDh, layer, new_BTKDh, slot_BT, num_new_B)


def write_slots(cache_LBSKDh: jax.Array | Int8KV, layer: jax.Array | int, new_BTKDh: jax.Array,
                slot_BT: jax.Array, num_new_B: jax.Array | None = None) -> jax.Array:
  """Stores new_BTKDh[b, t] at layer `layer`, slot slot_BT[b, t], for t < num_new_B[b]."""
  B, T = new_BTKDh.shape[:2]
  S = cache_LBSKDh.shape[2]
  slot_BT = jnp.where(_valid_BT(B, T, num_new_B), slot_BT, S)
  batch_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
  return _set(cache_LBSKDh, (layer, batch_BT, slot_BT), new_BTKDh)


def write_paged(pages_LNPKDh: jax.Array | Int8KV, layer: jax.Array | int, new_BTKDh: jax.Array,
                page_table_BM: jax.Array, starts_B: jax.Array,
                num_new_B: jax.Array | None = None) -> jax.Array:
  """Stores new_BTKDh[b, t] at position starts_B[b] + t of sequence b's pages in layer `layer`
  (t < num_new_B[b])."""
  pos_BT = starts_B[:, None] + jnp.arange(new_BTKDh.shape[1], dtype=jnp.int32)[None, :]
  return write_paged_slots(pages_LNPKDh, layer, new_BTKDh, page_table_BM, pos_BT, num_new_B)


def write_paged_slots(pages_LNPKDh: jax.Array | Int8KV, layer: jax.Array | int,
                      new_BTKDh: jax.Array, page_table_BM: jax.Array, slot_BT: jax.Array,
                      num_new_B: jax.Array | None = None) -> jax.Array:
  """Stores new_BTKDh[b, t] at slot slot_BT[b, t] of sequence b's pages (page
  page_table_BM[b, slot // P]) in layer `layer`, for t < num_new_B[b]."""
  B, T = new_BTKDh.shape[:2]
  N, P = pages_LNPKDh.shape[1:3]
  page_BT = jnp.take_along_axis(page_table_BM,
                                jnp.minimum(slot_BT // P, page_table_BM.shape[1] - 1), axis=1)
  page_BT = jnp.where(_valid_BT(B, T, num_new_B), page_BT, N)
  return _set(pages_LNPKDh, (layer, page_BT, slot_BT % P), new_BTKDh)


def read_paged(pages_LNPKDh: jax.Array | Int8KV, layer: jax.Array | int,
               page_table_BM: jax.Array, dtype) -> jax.Array:
  """Layer `layer` of each sequence's pages as a contiguous view `[B, M * P, K, Dh]` in `dtype`
  (slot i from page page_table_BM[b, i // P]; dequantized if int8)."""
  L, N = pages_LNPKDh.shape[:2]
  # Layer l's pages are rows l * N .. of the flattened pool: the gather reads only the pages
  # the table names, never a copy of the layer's whole pool.
  rows_BM = page_table_BM + layer * N
  flat = lambda a: a.reshape(L * N, *a.shape[2:])
  if isinstance(pages_LNPKDh, Int8KV):
    return gather_pages(flat(pages_LNPKDh.values), rows_BM, dtype, flat(pages_LNPKDh.scales))
  return gather_pages(flat(pages_LNPKDh), rows_BM, dtype)
