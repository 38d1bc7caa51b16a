"""The engine's host-side scheduling: which requests hold a decode slot, and their pages.

`Scheduler` keeps the waiting queue, the `max_slots` slots and the page pool's bookkeeping
(`paging.PageAllocator`, `prefix_cache.PrefixCache`): it admits waiting requests as soon as a
slot and their pages are free, grows page tables a page at a time, preempts the youngest
running request when the pool runs dry (its pages released, the request back at the head of
the queue, later recomputed from its prompt plus the tokens it already produced), releases the
pages a sliding window has passed, and turns the running requests into a step's host arrays
(page table, lengths, active flags, draw counts). It touches no device array: what the steps
compute is `runner.Runner`'s, and what requests see is the engine's.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import numpy as np

from jaxllm.inference import paging, sampling
from jaxllm.inference import prefix_cache as prefix_cache_lib
from jaxllm.inference.generate import FinishReason, bucket


@dataclasses.dataclass
class Request:
  """One request's state; `tokens`/`logprobs` grow as it runs. `on_token(request, token)` and
  `on_finish(request)` are called from the engine's thread."""
  id: str
  prompt: list[int]
  params: sampling.SamplingParams
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: FinishReason | None = None
  arrival: float = dataclasses.field(default_factory=time.monotonic)
  first_token_at: float | None = None
  on_token: Callable | None = None
  on_finish: Callable | None = None
  # Scheduling.
  pages: list[int] = dataclasses.field(default_factory=list)
  slot: int | None = None
  prefilled: int = 0  # tokens of `sequence` already in the cache (+ `inflight` fed ones)
  inflight: int = 0  # tokens fed by dispatched decode steps the host has not read yet
  preemptions: int = 0
  prefix_keys: frozenset = frozenset()  # prefix-cache keys of its full prompt pages
  cancelled: bool = False
  key: int = -1  # submission number (the same on every process of a lockstep engine)
  adapter: int = 0  # LoRA adapter slot where the params hold a bank (0: the base alone)
  constraint: object | None = None  # a `grammar.Constraint` its tokens must follow
  # The token that ended it (end of sequence or a stop token id; not in `tokens`) and its
  # logprob, which completions' logprobs report.
  stop_token: int | None = None
  stop_logprob: float | None = None
  # The token its next draw gives, where the last speculative step drew it (a request under a
  # grammar: the engine proposes it first, a sure proposal). None: not known.
  known_next: int | None = None

  @property
  def sequence(self) -> list[int]:
    """What the cache must hold before the next draw: the prompt and every produced token."""
    return self.prompt + self.tokens

  @property
  def done(self) -> bool:
    return self.finish_reason is not None


class Scheduler:
  """Slots, queue and pages of one engine. `config` an `engine.EngineConfig`; `max_pages` the
  pages one sequence may hold; `window` the attention window pages are released behind (0:
  none); `stats` the engine's counters, which scheduling adds to."""

  def __init__(self, config, *, max_pages: int, max_seq_len: int, streaming: bool, window: int,
               stats: collections.Counter):
    self.config, self.max_pages, self.max_seq_len = config, max_pages, max_seq_len
    self.streaming, self.window, self.stats = streaming, window, stats
    self.allocator = paging.PageAllocator(config.num_pages)
    self.prefix_cache = prefix_cache_lib.PrefixCache(self.allocator, config.page_size)
    self.slots: list[Request | None] = [None] * config.max_slots
    self.waiting: collections.deque[Request] = collections.deque()

  @property
  def running(self) -> list[Request]:
    return [r for r in self.slots if r is not None]

  def release(self, request: Request) -> None:
    """The request leaves its slot (if it holds one) and gives back its pages."""
    if request.slot is not None:
      self.slots[request.slot] = None
      request.slot = None
    self.allocator.release([p for p in request.pages if p != paging.RELEASED])
    request.pages = []

  def release_out_of_window(self) -> None:
    """A sliding-window model's decoding requests give back the pages no later query can see:
    every slot of page i is below the next token's window once (i + 1) * P <= n - W + 1, for n
    tokens cached (a speculative rollback never goes below n). The page-table entries stay, as
    RELEASED, so positions keep their columns; attention never reads them (the kernels start at
    the window's first page, the XLA path masks them). Prefill keeps its pages until the prompt
    is done (so the prefix cache can register them)."""
    W, P = self.window, self.config.page_size
    if not W or self.streaming:  # a streaming ring reuses its pages instead
      return
    for r in self.running:
      if r.prefilled < len(r.sequence):
        continue
      dead = min(max(r.prefilled - W + 1, 0) // P, len(r.pages))
      gone = [p for p in r.pages[:dead] if p != paging.RELEASED]
      if gone:
        self.allocator.release(gone)
        r.pages[:dead] = [paging.RELEASED] * dead
        self.stats["window_pages_released"] += len(gone)

  def allocate(self, n: int, requester: Request) -> list[int] | None:
    """n pages: free ones, then evicted prefix-cache pages, then the pages of the youngest
    running request; None when the requester itself is the youngest (preempt it instead)."""
    while True:
      short = n - self.allocator.num_free
      if short <= 0:
        return self.allocator.allocate(n)
      if self.prefix_cache.evict(short) >= short:
        continue
      victim = max(self.running, key=lambda r: r.arrival)
      if victim is requester:
        return None
      self.preempt(victim)

  def allocate_free(self, n: int) -> list[int]:
    """n pages from the free list and the prefix cache only (never preempting); [] if short."""
    if self.allocator.num_free < n:
      self.prefix_cache.evict(n - self.allocator.num_free)
    return self.allocator.allocate(n) if self.allocator.num_free >= n else []

  def preempt(self, request: Request) -> None:
    self.release(request)
    request.prefilled = request.inflight = 0  # an in-flight token is dropped and redrawn
    request.known_next = None
    request.preemptions += 1
    self.stats["preemptions"] += 1
    self.waiting.appendleft(request)

  def admit(self) -> list[Request]:
    """Moves waiting requests into free slots, oldest first, while their pages are free
    (admission never preempts: a request waits for pages rather than evicting a runner);
    returns the admitted ones."""
    admitted = []
    while self.waiting and None in self.slots:
      request = self.waiting[0]
      seq = request.sequence
      shared = (self.prefix_cache.lookup(seq, request.adapter) if self.config.prefix_caching
                else [])
      need = (paging.pages_for(len(seq), self.config.page_size) - len(shared)
              if not self.streaming else self.max_pages)
      if self.allocator.num_free < need:
        self.prefix_cache.evict(need - self.allocator.num_free)
      if (self.allocator.num_free < need
          or self._prefix_being_written(seq, len(shared), request.adapter)):
        self.allocator.release(shared)
        self.prefix_cache.hits -= len(shared)
        break
      self.waiting.popleft()
      request.pages = shared + self.allocator.allocate(need)
      request.prefilled = len(shared) * self.config.page_size
      self.stats["prefix_hit_tokens"] += request.prefilled
      request.slot = self.slots.index(None)
      self.slots[request.slot] = request
      if self.config.prefix_caching:
        P = self.config.page_size
        request.prefix_keys = frozenset(self.prefix_cache.keys(
            request.prompt, len(request.prompt) // P, request.adapter))
      admitted.append(request)
    return admitted

  def _prefix_being_written(self, seq: list[int], cached: int, adapter: int) -> bool:
    """Whether a running request is prefilling the prompt page that would extend `seq`'s
    cached prefix. Waiting for it costs nothing (prefill runs oldest first, so this request
    could not start before it anyway) and saves recomputing the page: requests arriving
    together with one system prompt compute it once."""
    if not self.config.prefix_caching or cached >= (len(seq) - 1) // self.config.page_size:
      return False
    key = self.prefix_cache.keys(seq, cached + 1, adapter)[-1]
    return any(key in r.prefix_keys for r in self.prefilling())

  def table_width(self, requests: list[Request]) -> int:
    """Page-table columns for these requests' pages: a power of two, so attention reads (and
    gathers) what the longest sequence holds, not max_seq_len, with a handful of compiled
    widths. Streaming rows all hold max_pages: their ring spans exactly those pages' slots."""
    if self.streaming:
      return self.max_pages
    return min(bucket(max(len(r.pages) for r in requests), minimum=1), self.max_pages)

  def prefilling(self) -> list[Request]:
    """Requests holding a slot whose sequence is not all in the cache yet, oldest first."""
    return sorted((r for r in self.running if r.prefilled < len(r.sequence)),
                  key=lambda r: r.arrival)

  def ready(self) -> list[Request]:
    """Running requests whose next token can be drawn: prefill done, every token produced so
    far fed, and max_tokens not yet reached counting the tokens in flight."""
    return [r for r in self.running if r.prefilled == len(r.sequence) + r.inflight
            and len(r.tokens) + r.inflight < r.params.max_tokens]

  def grow_pages(self) -> list[Request]:
    """Gives every ready request room for the token it is about to feed, oldest first
    (preempting the youngest when the pool is dry); returns those still ready."""
    for r in sorted(self.ready(), key=lambda r: r.arrival):
      if r.slot is None:
        continue  # preempted to make room for an older one
      if not self.streaming and r.prefilled + 1 > len(r.pages) * self.config.page_size:
        pages = self.allocate(1, r)
        if pages is None:
          self.preempt(r)
          continue
        r.pages += pages
    return self.ready()

  def batch_arrays(self, ready: list[Request], width: int):
    """Page table [B, width], lengths [B], active [B] and draw steps [B] of the ready slots."""
    B = self.config.max_slots
    table = np.zeros((B, width), np.int32)
    lengths = np.zeros((B,), np.int32)
    active = np.zeros((B,), bool)
    steps = np.zeros((B,), np.int32)
    for r in ready:
      table[r.slot, :len(r.pages)] = np.maximum(r.pages, 0)  # RELEASED entries: any page
      lengths[r.slot] = r.prefilled
      active[r.slot] = True
      steps[r.slot] = len(r.tokens) + r.inflight
    return table, lengths, active, steps

  def kv_utilisation(self) -> float:
    """Tokens the running requests keep in the cache (prompt and output so far, whether or not
    prefill has reached them yet) / capacity of the pages they hold."""
    P = self.config.page_size
    held = {p for r in self.running for p in r.pages if p != paging.RELEASED}
    released = lambda r: sum(p == paging.RELEASED for p in r.pages) * P
    tokens = sum(min(len(r.sequence) + r.inflight, len(r.pages) * P) - released(r)
                 for r in self.running)
    return tokens / max(len(held) * P, 1)
