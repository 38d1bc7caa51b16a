"""Continuous batching over a paged KV cache (vLLM-style), driven by a host loop.

The device holds one page pool per layer `[L, N, P, K, Dh]` shared by `max_slots` decode slots,
and per slot the logits its next token will be drawn from. Two jitted functions do all device
work, each with fixed shapes (the page table's width is rounded up to a power of two, so there
are at most log2(max pages per sequence) + 1 variants of each):
  `_prefill`  one chunk of `prefill_chunk` tokens of one request into its pages;
  `_decode`   draw a token for every slot from its logits (per-request sampling), feed it,
              keep the new logits; empty slots store nothing.
The host (`Engine.step`) admits waiting requests as soon as a slot and their pages are free,
runs at most one prefill chunk per step beside the decode step (so running streams keep
flowing while long prompts come in), grows page tables a page at a time, streams tokens,
applies stop tokens / stop strings / max_tokens, and frees pages the moment a request ends.

Running out of pages never fails a request: the youngest running one is preempted (pages
released, request back at the head of the queue) and later recomputed from its prompt plus the
tokens it already produced. Its n-th token still draws with `fold_in(PRNGKey(seed), n)`, so
its output is what it would have been uninterrupted.

Prefix caching: every page that a prompt fills completely is registered under the hash of all
tokens up to its end; a later prompt with the same prefix takes those pages by reference
(`PageAllocator.retain`) and prefills only the rest. Cached pages stay until the pool needs
them (least recently used first).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.inference import generate as gen
from jaxllm.inference import kv_cache, sampling, speculative


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  max_slots: int = 8
  num_pages: int = 256
  page_size: int = 16
  prefill_chunk: int = 64
  max_seq_len: int | None = None  # default: the model's
  prefix_caching: bool = True
  cache_dtype: str = "float32"
  # Speculative decoding by prompt lookup: each step verifies up to k proposed tokens per slot
  # (0: off). Steps where some running request uses penalties decode one token per slot.
  speculative_k: int = 0
  speculative_ngram: int = 3

  def __post_init__(self):
    for name in ("max_slots", "num_pages", "page_size", "prefill_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if not 0 <= self.speculative_k <= 16 or self.speculative_ngram < 1:
      raise ValueError(f"speculative_k={self.speculative_k} must be in [0, 16] and "
                       f"speculative_ngram={self.speculative_ngram} >= 1")
    if self.cache_dtype not in ("float32", "bfloat16", "int8"):
      raise ValueError(f"cache_dtype={self.cache_dtype!r} must be float32, bfloat16 or int8")


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
  finish_reason: str | None = None  # "stop", "length", "cancelled"
  arrival: float = dataclasses.field(default_factory=time.monotonic)
  first_token_at: float | None = None
  on_token: Callable | None = None
  on_finish: Callable | None = None
  # Engine bookkeeping.
  pages: list[int] = dataclasses.field(default_factory=list)
  slot: int | None = None
  prefilled: int = 0  # tokens of `sequence` already in the cache
  preemptions: int = 0
  cancelled: bool = False

  @property
  def sequence(self) -> list[int]:
    """What the cache must hold before the next draw: the prompt and every produced token."""
    return self.prompt + self.tokens

  @property
  def done(self) -> bool:
    return self.finish_reason is not None


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("k", "v"))
def _prefill(graphdef, params, k, v, page_row_1M, length_1, tokens_1T, num_new_1):
  gen._TRACES["engine_prefill"] += 1
  cache = kv_cache.PagedKVCache(k, v, page_row_1M, length_1)
  logits, cache = nnx.merge(graphdef, params).extend(tokens_1T, cache, num_new_1,
                                                     last_only=True)
  return logits[:, 0], cache.k, cache.v


@functools.partial(jax.jit, static_argnames=("graphdef", "penalties"),
                   donate_argnames=("k", "v", "logits_BV", "counts_BV"))
def _decode(graphdef, params, k, v, page_table_BM, lengths_B, active_B, logits_BV, arrays,
            steps_B, counts_BV, prompt_mask_BV, *, penalties: bool):
  gen._TRACES["engine_decode"] += 1
  V = logits_BV.shape[-1]
  processed = logits_BV
  if penalties:
    processed = sampling.apply_penalties(logits_BV, arrays, counts_BV, prompt_mask_BV)
  tok_B = sampling.draw(processed, arrays, sampling.row_keys(arrays, steps_B))
  logp_B = sampling.token_logprobs(logits_BV, tok_B)
  if penalties:
    counts_BV = counts_BV + jax.nn.one_hot(tok_B, V, dtype=jnp.int32) * active_B[:, None]
  cache = kv_cache.PagedKVCache(k, v, page_table_BM, lengths_B)
  new_B1V, cache = nnx.merge(graphdef, params).extend(tok_B[:, None], cache,
                                                      active_B.astype(jnp.int32))
  logits_BV = jnp.where(active_B[:, None], new_B1V[:, 0], logits_BV)
  return tok_B, logp_B, logits_BV, counts_BV, cache.k, cache.v


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "max_ngram"),
                   donate_argnames=("k_pages", "v_pages", "logits_BV"))
def _decode_speculative(graphdef, params, k_pages, v_pages, page_table_BM, lengths_B, active_B,
                        logits_BV, arrays, steps_B, exclude_B, hist_BH, drafts_B, *, k: int,
                        max_ngram: int):
  """One step that emits 1 to 1 + drafts_B[b] tokens per slot.

  The slot's logits give t0 (drawn from the target's distribution with `exclude_B[b]` removed:
  the correction owed by the previous step's rejected proposal); prompt lookup over the history
  plus t0 proposes d_1..d_k; the target scores [t0, d_1..d_k] in one pass; d_i is accepted
  while u_i < p_{i-1}(d_i) (one-hot proposals, so this keeps the target's distribution, and
  greedy rows accept exactly the argmax). The new slot logits are those after the last accepted
  token, and the first rejected proposal becomes the next step's exclusion.
  """
  gen._TRACES["engine_decode_speculative"] += 1
  B, V = logits_BV.shape
  rows_B = jnp.arange(B)
  keys_B2 = sampling.row_keys(arrays, steps_B)
  p0_BV = sampling.probabilities(logits_BV, arrays)
  resid_BV = p0_BV * (jnp.arange(V)[None, :] != exclude_B[:, None])
  resid_BV = jnp.where(jnp.sum(resid_BV, -1, keepdims=True) > 0, resid_BV, p0_BV)
  t0_B = jnp.where(exclude_B >= 0, speculative._sample_from(resid_BV, keys_B2),
                   sampling.draw(logits_BV, arrays, keys_B2))
  hist_BH = hist_BH.at[rows_B, lengths_B].set(t0_B, mode="drop")
  d_Bk = speculative._ngram_proposals(hist_BH, lengths_B + 1, t0_B, k=k, max_ngram=max_ngram)
  cache = kv_cache.PagedKVCache(k_pages, v_pages, page_table_BM, lengths_B)
  tokens_BT = jnp.concatenate([t0_B[:, None], d_Bk], axis=1)
  fed_B = (1 + drafts_B) * active_B.astype(jnp.int32)
  logits_BTV, cache = nnx.merge(graphdef, params).extend(tokens_BT, cache, fed_B)
  p_BTV = sampling.probabilities(logits_BTV.reshape(B * (k + 1), V),
                                 jax.tree.map(lambda a: jnp.repeat(a, k + 1, axis=0), arrays)
                                 ).reshape(B, k + 1, V)
  u_Bk = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (k,)))(keys_B2)
  p_at_d = jnp.take_along_axis(p_BTV[:, :k], d_Bk[..., None], axis=-1)[..., 0]
  accept_Bk = (u_Bk < p_at_d) & (jnp.arange(k)[None, :] < drafts_B[:, None])
  n_acc_B = jnp.sum(jnp.cumprod(accept_Bk, axis=1), axis=1).astype(jnp.int32)
  logp_BT = jnp.concatenate([
      sampling.token_logprobs(logits_BV, t0_B)[:, None],
      jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :k], axis=-1), d_Bk[..., None],
                          axis=-1)[..., 0]], axis=1)
  new_BV = jnp.take_along_axis(logits_BTV, n_acc_B[:, None, None], axis=1)[:, 0]
  logits_BV = jnp.where(active_B[:, None], new_BV, logits_BV)
  rejected_B = jnp.take_along_axis(d_Bk, jnp.minimum(n_acc_B, k - 1)[:, None], axis=1)[:, 0]
  exclude_B = jnp.where(active_B & (n_acc_B < drafts_B), rejected_B, -1)
  return tokens_BT, logp_BT, n_acc_B, logits_BV, exclude_B, cache.k, cache.v


class PrefixCache:
  """Full prompt pages by the hash of every token up to their end; LRU order."""

  def __init__(self, allocator: kv_cache.PageAllocator, page_size: int):
    self.allocator = allocator
    self.page_size = page_size
    self._pages: collections.OrderedDict[int, int] = collections.OrderedDict()
    self.hits = 0  # pages reused

  def _keys(self, tokens: Sequence[int], n_pages: int):
    P = self.page_size
    return [hash(tuple(tokens[:(i + 1) * P])) for i in range(n_pages)]

  def lookup(self, prompt: Sequence[int]) -> list[int]:
    """Pages holding the longest cached run of the prompt's full pages (retained for the
    caller); the last prompt token is always left to compute."""
    pages = []
    for key in self._keys(prompt, (len(prompt) - 1) // self.page_size):
      page = self._pages.get(key)
      if page is None:
        break
      self._pages.move_to_end(key)
      pages.append(page)
    self.allocator.retain(pages)
    self.hits += len(pages)
    return pages

  def register(self, prompt: Sequence[int], pages: Sequence[int]) -> None:
    """Offers the prompt's full pages (already written) to later requests."""
    for key, page in zip(self._keys(prompt, len(prompt) // self.page_size), pages):
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

  def __len__(self):
    return len(self._pages)


class Engine:
  """Continuous batching for one model. Thread-safe `submit`/`cancel`; `step` or
  `run_until_idle` from one thread (or `start()` a background loop)."""

  def __init__(self, graphdef, params, config: EngineConfig = EngineConfig(), *,
               eos_id: int = -1, decode: Callable[[list[int]], str] | None = None):
    self.graphdef, self.params, self.config = graphdef, params, config
    self.model_config = cfg = gen.model_config(graphdef, params)
    self.eos_id = eos_id
    self.decode_text = decode
    self.max_seq_len = config.max_seq_len or cfg.max_seq_len
    self.max_pages = kv_cache.pages_for(self.max_seq_len, config.page_size)
    if config.num_pages < self.max_pages:
      raise ValueError(f"num_pages={config.num_pages} cannot hold one sequence of "
                       f"max_seq_len {self.max_seq_len} ({self.max_pages} pages of "
                       f"{config.page_size})")
    self.allocator = kv_cache.PageAllocator(config.num_pages)
    self.prefix_cache = PrefixCache(self.allocator, config.page_size)
    B, V = config.max_slots, cfg.vocab_size
    shape = (cfg.n_layers, config.num_pages, config.page_size, cfg.n_kv_heads, cfg.head_dim)
    self._k = kv_cache.zeros(shape, config.cache_dtype)
    self._v = kv_cache.zeros(shape, config.cache_dtype)
    self._logits = jnp.zeros((B, V), jnp.float32)
    self._counts = jnp.zeros((B, V), jnp.int32)
    self._prompt_mask = np.zeros((B, V), bool)
    self._exclude = np.full((B,), -1, np.int32)  # speculative correction owed per slot
    self._slots: list[Request | None] = [None] * B
    self._arrays_for: tuple | None = None  # the slot occupants _arrays was built for
    self._arrays = None
    self._waiting: collections.deque[Request] = collections.deque()
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._stop = False
    self.stats = collections.Counter()

  # ---- requests -------------------------------------------------------------------------

  def submit(self, prompt: Sequence[int], params: sampling.SamplingParams, *,
             request_id: str | None = None, on_token=None, on_finish=None) -> Request:
    prompt = [int(t) for t in prompt]
    if not prompt:
      raise ValueError("the prompt needs at least one token")
    if min(prompt) < 0 or max(prompt) >= self.model_config.vocab_size:
      raise ValueError(f"prompt has token ids outside [0, {self.model_config.vocab_size})")
    if len(prompt) + params.max_tokens > self.max_seq_len:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                       f"exceeds the context of {self.max_seq_len} tokens")
    request = Request(request_id or f"req-{next(self._ids)}", prompt, params,
                      on_token=on_token, on_finish=on_finish)
    with self._wake:
      self._waiting.append(request)
      self._wake.notify()
    return request

  def cancel(self, request: Request) -> None:
    """Ends the request at the next step and frees its pages (no-op when already done)."""
    request.cancelled = True
    with self._wake:
      self._wake.notify()

  @property
  def idle(self) -> bool:
    return not self._waiting and all(s is None for s in self._slots)

  def metrics(self) -> dict:
    return dict(queue_depth=len(self._waiting),
                active_slots=sum(s is not None for s in self._slots),
                pages_in_use=self.allocator.num_pages - self.allocator.num_free,
                pages_total=self.allocator.num_pages, prefix_cached_pages=len(self.prefix_cache),
                **self.stats)

  def kv_utilisation(self) -> float:
    """Tokens the running requests keep in the cache (prompt and output so far, whether or not
    prefill has reached them yet) / capacity of the pages they hold."""
    held = {p for s in self._slots if s is not None for p in s.pages}
    tokens = sum(min(len(s.sequence), len(s.pages) * self.config.page_size)
                 for s in self._slots if s is not None)
    return tokens / max(len(held) * self.config.page_size, 1)

  # ---- the loop ---------------------------------------------------------------------------

  def step(self) -> bool:
    """One scheduling iteration; returns whether there was anything to do."""
    with self._lock:
      self._drop_cancelled()
      self._admit()
    if all(s is None for s in self._slots):
      return bool(self._waiting)
    self._prefill_one_chunk()
    self._decode_step()
    return True

  def run_until_idle(self, max_steps: int | None = None) -> None:
    for i in itertools.count():
      if self.idle or (max_steps is not None and i >= max_steps):
        return
      self.step()

  def start(self) -> None:
    """Runs the loop in a daemon thread until `shutdown()`."""
    def loop():
      while not self._stop:
        with self._wake:
          while self.idle and not self._stop:
            self._wake.wait()
        if not self._stop:
          self.step()
    self._thread = threading.Thread(target=loop, name="jaxllm-engine", daemon=True)
    self._thread.start()

  def shutdown(self) -> None:
    with self._wake:
      self._stop = True
      self._wake.notify()
    if self._thread is not None:
      self._thread.join()

  # ---- scheduling -------------------------------------------------------------------------

  def _free_pages(self, request: Request) -> None:
    self.allocator.release(request.pages)
    request.pages = []

  def _finish(self, request: Request, reason: str) -> None:
    request.finish_reason = reason
    if request.slot is not None:
      self._slots[request.slot] = None
      request.slot = None
    self._free_pages(request)
    self.stats["finished"] += 1
    if request.on_finish is not None:
      request.on_finish(request)

  def _drop_cancelled(self) -> None:
    for r in [r for r in self._waiting if r.cancelled]:
      self._waiting.remove(r)
      self._finish(r, "cancelled")
    for r in self._slots:
      if r is not None and r.cancelled:
        self._finish(r, "cancelled")

  def _allocate(self, n: int, requester: Request) -> list[int] | None:
    """n pages: free ones, then evicted prefix-cache pages, then the pages of the youngest
    running request; None when the requester itself is the youngest (preempt it instead)."""
    while True:
      short = n - self.allocator.num_free
      if short <= 0:
        return self.allocator.allocate(n)
      if self.prefix_cache.evict(short) >= short:
        continue
      running = [r for r in self._slots if r is not None]
      victim = max(running, key=lambda r: r.arrival)
      if victim is requester:
        return None
      self._preempt(victim)

  def _preempt(self, request: Request) -> None:
    self._slots[request.slot] = None
    request.slot = None
    self._free_pages(request)
    request.prefilled = 0
    request.preemptions += 1
    self.stats["preemptions"] += 1
    self._waiting.appendleft(request)

  def _admit(self) -> None:
    while self._waiting and None in self._slots:
      request = self._waiting[0]
      seq = request.sequence
      shared = self.prefix_cache.lookup(seq) if self.config.prefix_caching else []
      need = kv_cache.pages_for(len(seq), self.config.page_size) - len(shared)
      # Admission never preempts: a request waits for pages rather than evicting a runner.
      if self.allocator.num_free < need:
        self.prefix_cache.evict(need - self.allocator.num_free)
      if self.allocator.num_free < need:
        self.allocator.release(shared)
        self.prefix_cache.hits -= len(shared)
        return
      self._waiting.popleft()
      request.pages = shared + self.allocator.allocate(need)
      request.prefilled = len(shared) * self.config.page_size
      self.stats["prefix_hit_tokens"] += request.prefilled
      slot = self._slots.index(None)
      self._slots[slot] = request
      request.slot = slot
      self._exclude[slot] = -1
      self._prompt_mask[slot] = False
      self._prompt_mask[slot, request.prompt] = True

  def _table_width(self, pages: int) -> int:
    """Page-table columns for `pages` pages: a power of two, so attention reads (and gathers)
    what the longest sequence holds, not max_seq_len, with a handful of compiled widths."""
    return min(gen.bucket(pages, minimum=1), self.max_pages)

  def _page_row(self, request: Request) -> np.ndarray:
    return kv_cache.page_table_array([request.pages], self._table_width(len(request.pages)))

  def _prefill_one_chunk(self) -> None:
    """The oldest request still prefilling advances by one chunk."""
    pending = [r for r in self._slots if r is not None and r.prefilled < len(r.sequence)]
    if not pending:
      return
    request = min(pending, key=lambda r: r.arrival)
    seq, C = request.sequence, self.config.prefill_chunk
    chunk = seq[request.prefilled:request.prefilled + C]
    tokens = np.zeros((1, C), np.int32)
    tokens[0, :len(chunk)] = chunk
    logits, self._k, self._v = _prefill(
        self.graphdef, self.params, self._k, self._v, jnp.asarray(self._page_row(request)),
        jnp.asarray([request.prefilled], jnp.int32), jnp.asarray(tokens),
        jnp.asarray([len(chunk)], jnp.int32))
    request.prefilled += len(chunk)
    self.stats["prefill_tokens"] += len(chunk)
    if request.prefilled == len(seq):
      self._logits = self._logits.at[request.slot].set(logits[0])
      if request.tokens:  # recomputed after preemption: restore the penalty counts too
        counts = np.bincount(request.tokens, minlength=self.model_config.vocab_size)
        self._counts = self._counts.at[request.slot].set(jnp.asarray(counts, jnp.int32))
      else:
        self._counts = self._counts.at[request.slot].set(0)
      if self.config.prefix_caching:
        self.prefix_cache.register(request.prompt, request.pages)

  def _decode_step(self) -> None:
    ready = [r for r in self._slots if r is not None and r.prefilled == len(r.sequence)]
    # Every ready request needs room for the token it is about to feed; the oldest first.
    for r in sorted(ready, key=lambda r: r.arrival):
      if r.slot is None:
        continue  # preempted to make room for an older one
      if r.prefilled + 1 > len(r.pages) * self.config.page_size:
        pages = self._allocate(1, r)
        if pages is None:
          self._preempt(r)
          continue
        r.pages += pages
    ready = [r for r in self._slots if r is not None and r.prefilled == len(r.sequence)]
    if not ready:
      return
    self._refresh_arrays()
    if self.config.speculative_k and not self._penalties:
      return self._speculative_step(ready)
    # A step without proposals cannot pay a correction owed by an earlier speculative step (a
    # penalised request arrived in between): it is dropped, a bias on that one token only.
    self._exclude[:] = -1
    B = self.config.max_slots
    table = np.zeros((B, self._table_width(max(len(r.pages) for r in ready))), np.int32)
    lengths = np.zeros((B,), np.int32)
    active = np.zeros((B,), bool)
    steps = np.zeros((B,), np.int32)
    for r in ready:
      table[r.slot, :len(r.pages)] = r.pages
      lengths[r.slot] = r.prefilled
      active[r.slot] = True
      steps[r.slot] = len(r.tokens)
    penalties = self._penalties
    tok, logp, self._logits, self._counts, self._k, self._v = _decode(
        self.graphdef, self.params, self._k, self._v, jnp.asarray(table), jnp.asarray(lengths),
        jnp.asarray(active), self._logits, self._arrays,
        jnp.asarray(steps), self._counts, jnp.asarray(self._prompt_mask), penalties=penalties)
    tok, logp = jax.device_get((tok, logp))
    self.stats["decode_steps"] += 1
    now = time.monotonic()
    for r in ready:
      r.prefilled += 1  # the drawn token was fed and stored
      self._emit(r, int(tok[r.slot]), float(logp[r.slot]), now)

  def _refresh_arrays(self) -> None:
    occupants = tuple(r.params if r is not None else None for r in self._slots)
    if self._arrays_for is None or any(a is not b for a, b in zip(occupants, self._arrays_for)):
      # Rebuilt only when a slot changes hands (held objects, so identity is safe).
      params = [r.params if r is not None else sampling.SamplingParams() for r in self._slots]
      self._arrays, self._arrays_for = sampling.SamplingArrays.of(params), occupants
      self._penalties = any(p.uses_penalties for p in params)

  def _emit(self, r: Request, t: int, logp: float, now: float) -> bool:
    """Hands one produced token to its request; returns whether the request goes on."""
    if t == self.eos_id or t in r.params.stop_token_ids:
      self._finish(r, "stop")
      return False
    r.tokens.append(t)
    r.logprobs.append(logp)
    if r.first_token_at is None:
      r.first_token_at = now
    self.stats["generated_tokens"] += 1
    if r.params.stop and self.decode_text is not None:
      ids, text, hit = sampling.apply_stop_strings(r.tokens, r.params.stop, self.decode_text)
      if hit:
        r.tokens, r.logprobs, r.text = ids, r.logprobs[:len(ids)], text
        self._finish(r, "stop")
        return False
    if r.on_token is not None:
      r.on_token(r, t)
    if len(r.tokens) >= r.params.max_tokens:
      self._finish(r, "length")
      return False
    return True

  def _speculative_step(self, ready: list[Request]) -> None:
    """Decodes with prompt-lookup proposals; each slot emits 1 + (accepted proposals) tokens.

    A slot proposes only as many tokens as its pages, max_tokens and the context have room
    for; pages for proposals are taken from the free list (and the prefix cache) only, never
    by preempting another request.
    """
    k, P = self.config.speculative_k, self.config.page_size
    drafts = np.zeros((self.config.max_slots,), np.int32)
    for r in ready:
      want = min(k, r.params.max_tokens - len(r.tokens) - 1,
                 self.max_seq_len - r.prefilled - 1)
      extra = kv_cache.pages_for(r.prefilled + 1 + max(want, 0), P) - len(r.pages)
      if extra > 0:
        if self.allocator.num_free < extra:
          self.prefix_cache.evict(extra - self.allocator.num_free)
        if self.allocator.num_free >= extra:
          r.pages += self.allocator.allocate(extra)
      drafts[r.slot] = max(0, min(want, len(r.pages) * P - r.prefilled - 1))
    B = self.config.max_slots
    width = self._table_width(max(len(r.pages) for r in ready))
    table = np.zeros((B, width), np.int32)
    lengths = np.zeros((B,), np.int32)
    active = np.zeros((B,), bool)
    steps = np.zeros((B,), np.int32)
    hist = np.zeros((B, width * P), np.int32)
    for r in ready:
      table[r.slot, :len(r.pages)] = r.pages
      lengths[r.slot] = r.prefilled
      active[r.slot] = True
      steps[r.slot] = len(r.tokens)
      seq = r.sequence
      hist[r.slot, :len(seq)] = seq
    tokens, logp, n_acc, self._logits, exclude, self._k, self._v = _decode_speculative(
        self.graphdef, self.params, self._k, self._v, jnp.asarray(table), jnp.asarray(lengths),
        jnp.asarray(active), self._logits, self._arrays, jnp.asarray(steps),
        jnp.asarray(self._exclude), jnp.asarray(hist), jnp.asarray(drafts), k=k,
        max_ngram=self.config.speculative_ngram)
    tokens, logp, n_acc, exclude = jax.device_get((tokens, logp, n_acc, exclude))
    self._exclude = np.array(exclude, np.int32)
    self.stats["decode_steps"] += 1
    now = time.monotonic()
    for r in ready:
      slot, accepted = r.slot, int(n_acc[r.slot])
      self.stats["speculative_proposed"] += int(drafts[slot])
      self.stats["speculative_accepted"] += accepted
      r.prefilled += 1 + accepted  # t0 and the accepted proposals stay in the cache
      for j in range(1 + accepted):
        if not self._emit(r, int(tokens[slot, j]), float(logp[slot, j]), now):
          break


def generate_all(engine: Engine, prompts: Sequence[Sequence[int]],
                 params: Sequence[sampling.SamplingParams]) -> list[Request]:
  """Submits every prompt and runs the engine in this thread until all are done."""
  requests = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
  engine.run_until_idle()
  return requests
