"""Host-side page bookkeeping for paged KV caches: which pages each sequence holds.

The device-side page pools and tables are `jaxllm.model.cache.PagedKVCache`.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


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


# A page-list entry whose page was given back (it fell out of a sliding window): its slots are
# never read again, so the table may name any page there.
RELEASED = -1


def page_table_array(page_lists: Sequence[Sequence[int]], max_pages: int) -> np.ndarray:
  """`[B, max_pages]` int32 from each sequence's page list (unused and RELEASED entries 0)."""
  table = np.zeros((len(page_lists), max_pages), np.int32)
  for b, pages in enumerate(page_lists):
    if len(pages) > max_pages:
      raise ValueError(f"sequence {b} holds {len(pages)} pages, the table has {max_pages}")
    table[b, :len(pages)] = np.maximum(np.asarray(pages, np.int64), 0)
  return table
