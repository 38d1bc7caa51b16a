"""Prefix caching: full prompt pages shared by reference between requests.

Every page a prompt fills completely is registered under a hash chained over all tokens up to
its end; a later prompt with the same prefix takes those pages (`PageAllocator.retain`) and
prefills only the rest. Cached pages stay until the pool needs them (least recently used first).
A `salt` starts the chain: pages written under different LoRA adapters (whose k and v
projections differ) never match.
"""

from __future__ import annotations

import collections
from typing import Sequence

from jaxllm.inference import paging


class PrefixCache:
  """Full prompt pages by the hash of every token up to their end; LRU order."""

  def __init__(self, allocator: paging.PageAllocator, page_size: int):
    self.allocator = allocator
    self.page_size = page_size
    self._pages: collections.OrderedDict[int, int] = collections.OrderedDict()
    self.hits = 0  # pages reused

  def keys(self, tokens: Sequence[int], n_pages: int, salt: int = 0) -> list[int]:
    """Key of each of the first n_pages pages: a hash chained over every token up to its end
    (from `salt`)."""
    P, key, out = self.page_size, salt, []
    for i in range(n_pages):
      key = hash((key, tuple(tokens[i * P:(i + 1) * P])))
      out.append(key)
    return out

  def cached_pages(self, prompt: Sequence[int], salt: int = 0) -> int:
    """How many of the prompt's leading full pages are cached (nothing is retained)."""
    n = 0
    for key in self.keys(prompt, (len(prompt) - 1) // self.page_size, salt):
      if self._pages.get(key) is None:
        break
      n += 1
    return n

  def lookup(self, prompt: Sequence[int], salt: int = 0) -> list[int]:
    """Pages holding the longest cached run of the prompt's full pages (retained for the
    caller); the last prompt token is always left to compute."""
    pages = []
    for key in self.keys(prompt, (len(prompt) - 1) // self.page_size, salt):
      page = self._pages.get(key)
      if page is None:
        break
      self._pages.move_to_end(key)
      pages.append(page)
    self.allocator.retain(pages)
    self.hits += len(pages)
    return pages

  def register(self, prompt: Sequence[int], pages: Sequence[int], salt: int = 0) -> None:
    """Offers the prompt's full pages (already written) to later requests."""
    for key, page in zip(self.keys(prompt, len(prompt) // self.page_size, salt), pages):
      if key not in self._pages:
        self._pages[key] = page
        self.allocator.retain([page])

  def evict(self, n: int) -> int:
    """Releases up to n cached pages that no request holds (LRU first); returns how many."""
    freed = 0
    for key in list(self._pages):
      if freed == n:
        break
      page = self._pages[key]
      if self.allocator.refcount(page) == 1:
        del self._pages[key]
        self.allocator.release([page])
        freed += 1
    return freed

  def clear(self) -> int:
    """Forgets every cached page (new weights make their k and v stale); returns how many of
    them no request held (released to the pool)."""
    freed = self.evict(len(self._pages))
    for page in self._pages.values():
      self.allocator.release([page])
    self._pages.clear()
    return freed

  def __len__(self):
    return len(self._pages)
