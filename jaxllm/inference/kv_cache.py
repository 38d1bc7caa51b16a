"""KV caches (plain pytrees passed into and returned from jitted functions) and a page allocator.

Contiguous, `KVCache`:
  k, v: `[L, B, S, K, Dh]` (layers, batch, max_len, kv heads, head dim)
  lengths: `[B]` int32, tokens cached per sequence; the next token goes to slot lengths[b].

Paged, `PagedKVCache` (vLLM-style):
  k, v: `[L, N, P, K, Dh]`, a pool of N pages of P tokens per layer
  page_table: `[B, max_pages]` int32, slot i of sequence b lives in page page_table[b, i // P]
  lengths: `[B]` int32 as above.
Which pages a sequence owns is host-side bookkeeping (`PageAllocator`); the device only sees the
table. Table entries past a sequence's length may name any page: they are never read, and writes
there are dropped (`write`/`write_paged` only store the `num_new` valid tokens).

Rolling back (speculative decoding) is setting `lengths` lower: slots past the length are
overwritten before any query can see them, because attention masks by slot index.
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def init_paged_cache(n_layers: int, num_pages: int, page_size: int, n_kv_heads: int,
                     head_dim: int, page_table, lengths=None, dtype=jnp.float32) -> PagedKVCache:
  """A pool of `num_pages` zeroed pages per layer; `page_table` `[B, max_pages]` (host or device)."""
  shape = (n_layers, num_pages, page_size, n_kv_heads, head_dim)
  page_table = jnp.asarray(page_table, jnp.int32)
  if lengths is None:
    lengths = jnp.zeros((page_table.shape[0],), jnp.int32)
  return PagedKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), page_table,
                      jnp.asarray(lengths, jnp.int32))


def with_lengths(cache, lengths_B: jax.Array):
  """The same cache with other lengths (rollback, or sequences that took no tokens)."""
  return cache._replace(lengths=lengths_B.astype(jnp.int32))


def _valid_BT(B: int, T: int, num_new_B: jax.Array | None) -> jax.Array:
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  return jnp.ones((B, T), bool) if num_new_B is None else t < num_new_B[:, None]


def write(cache_LBSKDh: jax.Array, layer: jax.Array | int, new_BTKDh: jax.Array,
          starts_B: jax.Array, num_new_B: jax.Array | None = None) -> jax.Array:
  """Stores new_BTKDh[b, t] at layer `layer`, slot starts_B[b] + t, for t < num_new_B[b].

  Tokens past num_new (right padding) and slots past the end are dropped, never clamped onto
  valid slots.
  """
  B, T = new_BTKDh.shape[:2]
  S = cache_LBSKDh.shape[2]
  slot_BT = starts_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  slot_BT = jnp.where(_valid_BT(B, T, num_new_B), slot_BT, S)
  batch_BT = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
  return cache_LBSKDh.at[layer, batch_BT, slot_BT].set(new_BTKDh.astype(cache_LBSKDh.dtype),
                                                       mode="drop")


def write_paged(pages_LNPKDh: jax.Array, layer: jax.Array | int, new_BTKDh: jax.Array,
                page_table_BM: jax.Array, starts_B: jax.Array,
                num_new_B: jax.Array | None = None) -> jax.Array:
  """Stores new_BTKDh[b, t] at position starts_B[b] + t of sequence b's pages in layer `layer`
  (t < num_new_B[b])."""
  B, T = new_BTKDh.shape[:2]
  N, P = pages_LNPKDh.shape[1:3]
  pos_BT = starts_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  page_BT = jnp.take_along_axis(page_table_BM,
                                jnp.minimum(pos_BT // P, page_table_BM.shape[1] - 1), axis=1)
  page_BT = jnp.where(_valid_BT(B, T, num_new_B), page_BT, N)
  return pages_LNPKDh.at[layer, page_BT, pos_BT % P].set(new_BTKDh.astype(pages_LNPKDh.dtype),
                                                         mode="drop")


class OutOfPages(RuntimeError):
  """The pool has fewer free pages than asked for."""


class PageAllocator:
  """Host-side page bookkeeping: a free list and a reference count per page.

  A page returns to the free list when its last holder releases it, so full pages of a shared
  prompt prefix can be held by several sequences at once (`retain`).
  """

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages={num_pages} must be >= 1")
    self.num_pages = num_pages
    self._free = collections.deque(range(num_pages))
    self._refs = np.zeros(num_pages, np.int32)

  @property
  def num_free(self) -> int:
    return len(self._free)

  def refcount(self, page: int) -> int:
    return int(self._refs[page])

  def allocate(self, n: int) -> list[int]:
    """`n` fresh pages, each with one reference; raises OutOfPages (taking none) if too few."""
    if n > len(self._free):
      raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.num_pages} free")
    pages = [self._free.popleft() for _ in range(n)]
    self._refs[pages] = 1
    return pages

  def retain(self, pages: Sequence[int]) -> None:
    for p in pages:
      if self._refs[p] <= 0:
        raise ValueError(f"page {p} is free; only held pages can be shared")
      self._refs[p] += 1

  def release(self, pages: Sequence[int]) -> None:
    for p in pages:
      if self._refs[p] <= 0:
        raise ValueError(f"page {p} released more often than held")
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


def page_table_array(page_lists: Sequence[Sequence[int]], max_pages: int) -> np.ndarray:
  """`[B, max_pages]` int32 from each sequence's page list (unused entries 0)."""
  table = np.zeros((len(page_lists), max_pages), np.int32)
  for b, pages in enumerate(page_lists):
    if len(pages) > max_pages:
      raise ValueError(f"sequence {b} holds {len(pages)} pages, the table has {max_pages}")
    table[b, :len(pages)] = pages
  return table
