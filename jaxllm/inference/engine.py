"""Continuous batching over a paged KV cache (vLLM-style), driven by a host loop.

The device holds one page pool per layer `[L, N, P, K, Dh]` shared by `max_slots` decode slots,
and per slot the logits its next token will be drawn from. A few jitted functions do all device
work, each with fixed shapes (the page table's width is rounded up to a power of two, so there
are at most log2(max pages per sequence) + 1 variants of each):
  `_prefill`             one chunk of `prefill_chunk` tokens of one request into its pages;
  `_decode`              draw a token for every slot from its logits (per-request sampling),
                         feed it, keep the new logits; empty slots store nothing;
  `_decode_speculative`  the same with up to k proposals per slot verified in the pass.
The host (`Engine.step`) admits waiting requests as soon as a slot and their pages are free,
runs at most one prefill chunk per step beside the decode step (so running streams keep
flowing while long prompts come in), grows page tables a page at a time, streams tokens,
applies stop tokens / stop strings / max_tokens, and frees pages the moment a request ends.
Since the device feeds each drawn token itself, the host dispatches decode step n + 1 before it
reads step n's tokens (`EngineConfig.overlap`): its bookkeeping runs while the device works, and
a request that stopped at step n only wastes its row of step n + 1.

Running out of pages never fails a request: the youngest running one is preempted (pages
released, request back at the head of the queue) and later recomputed from its prompt plus the
tokens it already produced. Its n-th token still draws with `fold_in(PRNGKey(seed), n)`, so
its output is what it would have been uninterrupted.

Prefix caching: every page that a prompt fills completely is registered under a hash chained
over all tokens up to its end; a later prompt with the same prefix takes those pages by
reference (`PageAllocator.retain`) and prefills only the rest. A request whose next prefix page
another running request is still prefilling waits for it rather than computing it twice.
Cached pages stay until the pool needs them (least recently used first).

Speculative decoding (`speculative_k`): proposals come from prompt lookup or a draft model
whose own page pool is addressed by the same page tables, so prefix sharing, preemption and
freeing cover it unchanged.
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
  # Speculative decoding: each step verifies up to k proposed tokens per slot (0: off), from
  # prompt lookup or the `draft` model given to the Engine. Requests with penalties take one
  # token per step (they draft nothing) beside the others.
  speculative_k: int = 0
  speculative_ngram: int = 3
  # Dispatch each plain decode step before reading the previous step's tokens, so the host's
  # bookkeeping (streaming, stop checks, page growth, the next step's arrays) runs while the
  # device computes. Speculative steps need every token on the host first and stay in lockstep.
  overlap: bool = True

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
  prefilled: int = 0  # tokens of `sequence` already in the cache (+ `inflight` fed ones)
  inflight: int = 0  # tokens fed by dispatched decode steps the host has not read yet
  preemptions: int = 0
  prefix_keys: frozenset = frozenset()  # prefix-cache keys of its full prompt pages
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


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "max_ngram",
                                             "penalties"),
                   donate_argnames=("k_pages", "v_pages", "dk_pages", "dv_pages", "logits_BV",
                                    "sub_BV", "counts_BV"))
def _decode_speculative(graphdef, params, k_pages, v_pages, draft_graphdef, draft_params,
                        dk_pages, dv_pages, page_table_BM, lengths_B, active_B, logits_BV, arrays,
                        steps_B, sub_BV, hist_BH, drafts_B, counts_BV, prompt_mask_BV, *, k: int,
                        max_ngram: int, penalties: bool):
  """One step that emits 1 to 1 + drafts_B[b] tokens per slot.

  The slot's logits give t0, drawn from the target's distribution p, or from norm(max(p - s, 0))
  where the previous step rejected a proposal drawn from s (`sub_BV`, zero rows otherwise).
  The draft proposes d_1..d_k from distributions q_i: prompt lookup over the history (one-hot
  q) or a draft model with its own paged cache under the same page table (it feeds t0 and
  the proposals). The target scores [t0, d_1..d_k] in one pass and d_i is accepted while
  u_i q_i(d_i) < p_{i-1}(d_i). That keeps the target's distribution, and greedy rows (one-hot
  p and q) accept exactly the argmax. The new slot logits are those after the last accepted
  token; the first rejection's q becomes the next step's `sub_BV`. Rows with penalties draft
  nothing (drafts_B = 0): their counts change by t0 alone.
  """
  gen._TRACES["engine_decode_speculative"] += 1
  B, V = logits_BV.shape
  rows_B = jnp.arange(B)
  keys_B2 = sampling.row_keys(arrays, steps_B)
  processed_BV = logits_BV
  if penalties:
    processed_BV = sampling.apply_penalties(logits_BV, arrays, counts_BV, prompt_mask_BV)
  p0_BV = sampling.probabilities(processed_BV, arrays)
  resid_BV = jnp.maximum(p0_BV - sub_BV, 0.0)
  resid_BV = jnp.where(jnp.sum(resid_BV, -1, keepdims=True) > 0, resid_BV, p0_BV)
  t0_B = jnp.where(jnp.sum(sub_BV, -1) > 0, speculative._sample_from(resid_BV, keys_B2),
                   sampling.draw(processed_BV, arrays, keys_B2))
  if penalties:
    counts_BV = counts_BV + jax.nn.one_hot(t0_B, V, dtype=jnp.int32) * active_B[:, None]
  if draft_graphdef is None:
    hist_BH = hist_BH.at[rows_B, lengths_B].set(t0_B, mode="drop")
    d_Bk = speculative._ngram_proposals(hist_BH, lengths_B + 1, t0_B, k=k, max_ngram=max_ngram)
    q_BkV = jax.nn.one_hot(d_Bk, V, dtype=jnp.float32)
  else:
    draft = nnx.merge(draft_graphdef, draft_params)

    def draft_step(carry, i):
      dcache, tok_B = carry
      # Feeds position lengths + i; within the pages the row holds while i <= drafts_B.
      fed_B = (active_B & (i <= drafts_B)).astype(jnp.int32)
      out_B1V, dcache = draft.extend(tok_B[:, None], dcache, fed_B)
      q_BV = sampling.probabilities(out_B1V[:, 0], arrays)
      d_B = speculative._sample_from(
          q_BV, jax.vmap(lambda key: jax.random.fold_in(key, 2 + i))(keys_B2))
      return (dcache, d_B), (d_B, q_BV)

    # k + 1 feeds (t0, d_1..d_k): the last only writes d_k's entry, so the draft cache holds
    # every token the target may keep, and its proposal is unused.
    dcache = kv_cache.PagedKVCache(dk_pages, dv_pages, page_table_BM, lengths_B)
    (dcache, _), (d_TB, q_TBV) = jax.lax.scan(draft_step, (dcache, t0_B), jnp.arange(k + 1))
    dk_pages, dv_pages = dcache.k, dcache.v
    d_Bk, q_BkV = jnp.moveaxis(d_TB[:k], 0, 1), jnp.moveaxis(q_TBV[:k], 0, 1)
  cache = kv_cache.PagedKVCache(k_pages, v_pages, page_table_BM, lengths_B)
  tokens_BT = jnp.concatenate([t0_B[:, None], d_Bk], axis=1)
  fed_B = (1 + drafts_B) * active_B.astype(jnp.int32)
  logits_BTV, cache = nnx.merge(graphdef, params).extend(tokens_BT, cache, fed_B)
  p_BTV = sampling.probabilities(logits_BTV.reshape(B * (k + 1), V),
                                 speculative._repeat_rows(arrays, k + 1)).reshape(B, k + 1, V)
  u_Bk = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (k,)))(keys_B2)
  p_at_d = jnp.take_along_axis(p_BTV[:, :k], d_Bk[..., None], axis=-1)[..., 0]
  q_at_d = jnp.take_along_axis(q_BkV, d_Bk[..., None], axis=-1)[..., 0]
  accept_Bk = (u_Bk * q_at_d < p_at_d) & (jnp.arange(k)[None, :] < drafts_B[:, None])
  n_acc_B = jnp.sum(jnp.cumprod(accept_Bk, axis=1), axis=1).astype(jnp.int32)
  logp_BT = jnp.concatenate([
      sampling.token_logprobs(logits_BV, t0_B)[:, None],
      jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :k], axis=-1), d_Bk[..., None],
                          axis=-1)[..., 0]], axis=1)
  new_BV = jnp.take_along_axis(logits_BTV, n_acc_B[:, None, None], axis=1)[:, 0]
  logits_BV = jnp.where(active_B[:, None], new_BV, logits_BV)
  q_rej_BV = jnp.take_along_axis(q_BkV, jnp.minimum(n_acc_B, k - 1)[:, None, None], axis=1)[:, 0]
  sub_BV = jnp.where((active_B & (n_acc_B < drafts_B))[:, None], q_rej_BV, 0.0)
  return (tokens_BT, logp_BT, n_acc_B, logits_BV, sub_BV, counts_BV, cache.k, cache.v,
          dk_pages, dv_pages)


class PrefixCache:
  """Full prompt pages by the hash of every token up to their end; LRU order."""

  def __init__(self, allocator: kv_cache.PageAllocator, page_size: int):
    self.allocator = allocator
    self.page_size = page_size
    self._pages: collections.OrderedDict[int, int] = collections.OrderedDict()
    self.hits = 0  # pages reused

  def keys(self, tokens: Sequence[int], n_pages: int) -> list[int]:
    """Key of each of the first n_pages pages: a hash chained over every token up to its end."""
    P, key, out = self.page_size, 0, []
    for i in range(n_pages):
      key = hash((key, tuple(tokens[i * P:(i + 1) * P])))
      out.append(key)
    return out

  def lookup(self, prompt: Sequence[int]) -> list[int]:
    """Pages holding the longest cached run of the prompt's full pages (retained for the
    caller); the last prompt token is always left to compute."""
    pages = []
    for key in self.keys(prompt, (len(prompt) - 1) // self.page_size):
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
    for key, page in zip(self.keys(prompt, len(prompt) // self.page_size), pages):
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
               eos_id: int = -1, decode: Callable[[list[int]], str] | None = None,
               draft: speculative.Draft | None = None):
    """`draft`: what proposes tokens when `config.speculative_k` > 0; prompt lookup over the
    last `config.speculative_ngram` tokens by default, or a model (`speculative.model_draft`,
    `layer_skip_draft`) with the target's vocabulary, which gets its own page pool."""
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
    self._draft, self._dk, self._dv = self._draft_pool(draft)
    self._logits = jnp.zeros((B, V), jnp.float32)
    self._counts = jnp.zeros((B, V), jnp.int32)
    self._prompt_mask = np.zeros((B, V), bool)
    # Per slot, the draft distribution of the proposal the last speculative step rejected:
    # the next draw subtracts it (zero rows: nothing owed).
    self._sub = jnp.zeros((B, V), jnp.float32)
    self._slots: list[Request | None] = [None] * B
    self._pending: tuple | None = None  # a dispatched decode step's (tokens, logprobs, rows)
    self._arrays_for: tuple | None = None  # the slot occupants _arrays was built for
    self._arrays = None
    self._waiting: collections.deque[Request] = collections.deque()
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._stop = False
    self.stats = collections.Counter()

  def _draft_pool(self, draft: speculative.Draft | None):
    """(draft, k pages, v pages) for a model draft; (None, None, None) for prompt lookup."""
    if draft is not None and not self.config.speculative_k:
      raise ValueError("a draft needs speculative_k >= 1")
    if draft is None or draft.kind == "ngram":
      if draft is not None and draft.max_ngram != self.config.speculative_ngram:
        self.config = dataclasses.replace(self.config, speculative_ngram=draft.max_ngram)
      return None, None, None
    dcfg = gen.model_config(draft.graphdef, draft.params)
    if dcfg.vocab_size != self.model_config.vocab_size:
      raise ValueError(f"the draft's vocabulary ({dcfg.vocab_size}) is not the target's "
                       f"({self.model_config.vocab_size})")
    if dcfg.max_seq_len < self.max_seq_len:
      raise ValueError(f"the draft's context ({dcfg.max_seq_len}) is shorter than the "
                       f"engine's ({self.max_seq_len})")
    shape = (dcfg.n_layers, self.config.num_pages, self.config.page_size, dcfg.n_kv_heads,
             dcfg.head_dim)
    return (draft, kv_cache.zeros(shape, self.config.cache_dtype),
            kv_cache.zeros(shape, self.config.cache_dtype))

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
    return (not self._waiting and all(s is None for s in self._slots)
            and self._pending is None)

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
    tokens = sum(min(len(s.sequence) + s.inflight, len(s.pages) * self.config.page_size)
                 for s in self._slots if s is not None)
    return tokens / max(len(held) * self.config.page_size, 1)

  # ---- the loop ---------------------------------------------------------------------------

  def step(self) -> bool:
    """One scheduling iteration; returns whether there was anything to do."""
    with self._lock:
      self._drop_cancelled()
      self._admit()
    if all(s is None for s in self._slots):
      self._collect()  # a step whose requests have all ended since
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
    request.prefilled = request.inflight = 0  # an in-flight token is dropped and redrawn
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
      if self.allocator.num_free < need or self._prefix_being_written(seq, len(shared)):
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
      self._prompt_mask[slot] = False
      self._prompt_mask[slot, request.prompt] = True
      if self.config.prefix_caching:
        P = self.config.page_size
        request.prefix_keys = frozenset(self.prefix_cache.keys(request.prompt,
                                                               len(request.prompt) // P))

  def _prefix_being_written(self, seq: list[int], cached: int) -> bool:
    """Whether a running request is prefilling the prompt page that would extend `seq`'s
    cached prefix. Waiting for it costs nothing (prefill runs oldest first, so this request
    could not start before it anyway) and saves recomputing the page: requests arriving
    together with one system prompt compute it once."""
    if not self.config.prefix_caching or cached >= (len(seq) - 1) // self.config.page_size:
      return False
    key = self.prefix_cache.keys(seq, cached + 1)[-1]
    return any(key in r.prefix_keys for r in self._slots
               if r is not None and r.prefilled < len(r.sequence))

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
    args = (jnp.asarray(self._page_row(request)), jnp.asarray([request.prefilled], jnp.int32),
            jnp.asarray(tokens), jnp.asarray([len(chunk)], jnp.int32))
    logits, self._k, self._v = _prefill(self.graphdef, self.params, self._k, self._v, *args)
    if self._draft is not None:  # its cache holds the same tokens under the same page table
      _, self._dk, self._dv = _prefill(self._draft.graphdef, self._draft.params, self._dk,
                                       self._dv, *args)
    request.prefilled += len(chunk)
    self.stats["prefill_tokens"] += len(chunk)
    if request.prefilled == len(seq):
      self._logits = self._logits.at[request.slot].set(logits[0])
      self._sub = self._sub.at[request.slot].set(0.0)
      if request.tokens:  # recomputed after preemption: restore the penalty counts too
        counts = np.bincount(request.tokens, minlength=self.model_config.vocab_size)
        self._counts = self._counts.at[request.slot].set(jnp.asarray(counts, jnp.int32))
      else:
        self._counts = self._counts.at[request.slot].set(0)
      if self.config.prefix_caching:
        self.prefix_cache.register(request.prompt, request.pages)

  def _ready(self) -> list[Request]:
    """Running requests whose next token can be drawn: prefill done, every token produced so
    far fed, and max_tokens not yet reached counting the tokens in flight."""
    return [r for r in self._slots
            if r is not None and r.prefilled == len(r.sequence) + r.inflight
            and len(r.tokens) + r.inflight < r.params.max_tokens]

  def _grow_pages(self) -> list[Request]:
    """Gives every ready request room for the token it is about to feed, oldest first
    (preempting the youngest when the pool is dry); returns those still ready."""
    for r in sorted(self._ready(), key=lambda r: r.arrival):
      if r.slot is None:
        continue  # preempted to make room for an older one
      if r.prefilled + 1 > len(r.pages) * self.config.page_size:
        pages = self._allocate(1, r)
        if pages is None:
          self._preempt(r)
          continue
        r.pages += pages
    return self._ready()

  def _batch_arrays(self, ready: list[Request], width: int):
    """Page table [B, width], lengths [B], active [B] and draw steps [B] of the ready slots."""
    B = self.config.max_slots
    table = np.zeros((B, width), np.int32)
    lengths = np.zeros((B,), np.int32)
    active = np.zeros((B,), bool)
    steps = np.zeros((B,), np.int32)
    for r in ready:
      table[r.slot, :len(r.pages)] = r.pages
      lengths[r.slot] = r.prefilled
      active[r.slot] = True
      steps[r.slot] = len(r.tokens) + r.inflight
    return table, lengths, active, steps

  def _decode_step(self) -> None:
    ready = self._grow_pages()
    self._refresh_arrays()
    if self.config.speculative_k:
      self._collect()
      ready = self._ready()
      if ready:
        self._speculative_step(ready)
      return
    previous, self._pending = self._pending, None
    if ready:
      width = self._table_width(max(len(r.pages) for r in ready))
      table, lengths, active, steps = self._batch_arrays(ready, width)
      tok, logp, self._logits, self._counts, self._k, self._v = _decode(
          self.graphdef, self.params, self._k, self._v, jnp.asarray(table),
          jnp.asarray(lengths), jnp.asarray(active), self._logits, self._arrays,
          jnp.asarray(steps), self._counts, jnp.asarray(self._prompt_mask),
          penalties=self._penalties)
      self.stats["decode_steps"] += 1
      for r in ready:
        r.prefilled += 1  # the drawn token is fed and stored by the step
        r.inflight += 1
      self._pending = (tok, logp, [(r, r.slot, r.preemptions) for r in ready])
    # The device runs the step just dispatched while the host reads and hands out the last.
    if previous is not None:
      self._emit_step(previous)
    if not self.config.overlap:
      self._collect()

  def _collect(self) -> None:
    """Emits the tokens of the decode step still in flight, if any."""
    pending, self._pending = self._pending, None
    if pending is not None:
      self._emit_step(pending)

  def _emit_step(self, pending: tuple) -> None:
    """Reads a dispatched decode step's tokens and emits them to the requests that still hold
    the slot they had then; the others ended or were preempted since."""
    tok, logp, rows = pending
    tok, logp = jax.device_get((tok, logp))
    now = time.monotonic()
    for r, slot, epoch in rows:
      if r.done or r.slot != slot or r.preemptions != epoch:
        continue
      r.inflight -= 1
      self._emit(r, int(tok[slot]), float(logp[slot]), now)

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
    """Decodes with proposals; each slot emits 1 + (accepted proposals) tokens.

    A slot proposes only as many tokens as its pages, max_tokens and the context have room
    for (none when it uses penalties, whose counts the step keeps for one token); pages for
    proposals come from the free list (and the prefix cache) only, never by preempting
    another request.
    """
    k, P = self.config.speculative_k, self.config.page_size
    drafts = np.zeros((self.config.max_slots,), np.int32)
    for r in ready:
      want = 0 if r.params.uses_penalties else min(
          k, r.params.max_tokens - len(r.tokens) - 1, self.max_seq_len - r.prefilled - 1)
      extra = kv_cache.pages_for(r.prefilled + 1 + max(want, 0), P) - len(r.pages)
      if extra > 0:
        if self.allocator.num_free < extra:
          self.prefix_cache.evict(extra - self.allocator.num_free)
        if self.allocator.num_free >= extra:
          r.pages += self.allocator.allocate(extra)
      drafts[r.slot] = max(0, min(want, len(r.pages) * P - r.prefilled - 1))
    width = self._table_width(max(len(r.pages) for r in ready))
    table, lengths, active, steps = self._batch_arrays(ready, width)
    hist = None
    if self._draft is None:  # prompt lookup searches each slot's history on the device
      hist = np.zeros((self.config.max_slots, width * P), np.int32)
      for r in ready:
        seq = r.sequence
        hist[r.slot, :len(seq)] = seq
      hist = jnp.asarray(hist)
    draft = self._draft or speculative.Draft("ngram")
    (tokens, logp, n_acc, self._logits, self._sub, self._counts, self._k, self._v, self._dk,
     self._dv) = _decode_speculative(
        self.graphdef, self.params, self._k, self._v, draft.graphdef, draft.params, self._dk,
        self._dv, jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(active), self._logits,
        self._arrays, jnp.asarray(steps), self._sub, hist, jnp.asarray(drafts), self._counts,
        jnp.asarray(self._prompt_mask), k=k, max_ngram=self.config.speculative_ngram,
        penalties=self._penalties)
    tokens, logp, n_acc = jax.device_get((tokens, logp, n_acc))
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
