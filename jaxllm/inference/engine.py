"""Continuous batching over a paged KV cache (vLLM-style), driven by a host loop.

The device holds one page pool per layer `[L, N, P, K, Dh]` shared by `max_slots` decode slots,
and per slot the logits its next token will be drawn from (`steps.DecodeState`, one pytree). The jitted functions of
`jaxllm.inference.steps` do all device work, each with fixed shapes (the page table's width is
rounded up to a power of two, so there are at most log2(max pages per sequence) + 1 variants of
each). The host (`Engine.step`) admits waiting requests as soon as a slot and their pages are free,
runs at most one prefill chunk per step beside the decode step (so running streams keep
flowing while long prompts come in; with `mixed_steps` the chunk's tokens ride in the decode
step itself, `steps.mixed`), grows page tables a page at a time, streams tokens,
applies stop tokens / stop strings / max_tokens, and frees pages the moment a request ends.
Since the device feeds each drawn token itself, the host dispatches decode step n + 1 before it
reads step n's tokens (`EngineConfig.overlap`): its bookkeeping runs while the device works, and
a request that stopped at step n only wastes its row of step n + 1.

Running out of pages never fails a request: the youngest running one is preempted (pages
released, request back at the head of the queue) and later recomputed from its prompt plus the
tokens it already produced. Its n-th token still draws with `fold_in(PRNGKey(seed), n)`, so
its output is what it would have been uninterrupted.

Prefix caching (`jaxllm.inference.prefix_cache`): full prompt pages are shared by reference; a
request whose next prefix page another running request is still prefilling waits for it rather
than computing it twice.

Speculative decoding (`speculative_k`): proposals come from prompt lookup or a draft model
whose own page pool is addressed by the same page tables, so prefix sharing, preemption and
freeing cover it unchanged.

Structured output (`submit(constraint=)`, `jaxllm.inference.grammar`): before a step that
draws for a constrained request, the host reads every token still in flight, advances each
grammar past them and writes the slots' token bitmasks, which the step applies before its
draw (unconstrained slots allow everything; with no constrained slot the step compiles without
a mask). Such steps run in lockstep, and a constrained request drafts no speculative tokens.
A grammar that has nothing left to add ends its request ("stop"); one that allows no token
ends it with "grammar_dead_end". A request below its `min_tokens` takes the same path, its mask
without the end of sequence and its stop tokens.

Streaming (`stream_window`, StreamingLLM): every request gets a fixed set of pages that hold
its first `sink_tokens` tokens and a ring of the latest ones (`jaxllm.model.cache.Stream`), so
prompts and outputs may run past the context while each request's memory stays constant. A
preempted streaming request is recomputed by prefilling its whole text again, which leaves its
cache as a prefill of that text would (not token by token as it was built).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxllm.config import KV_CACHE_DTYPES
from jaxllm.inference import generate as gen
from jaxllm.inference import paging, sampling, speculative
from jaxllm.inference import steps as steps_lib
from jaxllm.inference import prefix_cache as prefix_cache_lib
from jaxllm.lora import bank as lora_bank
from jaxllm.model import cache as kv_cache
from jaxllm.parallel import placement


# Seconds an idle lockstep leader waits before stepping anyway (`Engine.start`).
LOCKSTEP_HEARTBEAT_S = 0.5


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  max_slots: int = 8
  num_pages: int = 256
  page_size: int = 16
  prefill_chunk: int = 64
  # Requests that advance by a chunk in one step's prefill call (the oldest first): 1 keeps
  # long prompts from holding up running streams; more admits a burst of short prompts (an
  # RL rollout's groups) in a few steps instead of one step each.
  prefill_rows: int = 1
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
  # StreamingLLM (stream_window > 0): attend to the first `sink_tokens` tokens and the
  # `stream_window` latest, in a constant number of pages per request, with no length limit.
  # Speculative decoding is refused (it would roll back a ring that already overwrote its
  # oldest slots) and prefix caching is off (a page's contents depend on how far the ring has
  # turned, not on the prefix alone).
  sink_tokens: int = 0
  stream_window: int = 0
  # Ragged steps: while requests prefill, each decode step also carries up to prefill_chunk of
  # their prompt tokens (`steps.mixed`), instead of a prefill call of its own before the decode
  # call, so a long prompt arriving adds to the running streams' steps rather than holding
  # them up for a chunk. Not with speculative decoding or a streaming cache (refused).
  mixed_steps: bool = False

  @property
  def stream(self) -> kv_cache.Stream | None:
    return gen.stream_of(self.sink_tokens, self.stream_window)

  def __post_init__(self):
    for name in ("max_slots", "num_pages", "page_size", "prefill_chunk", "prefill_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if not 0 <= self.speculative_k <= 16 or self.speculative_ngram < 1:
      raise ValueError(f"speculative_k={self.speculative_k} must be in [0, 16] and "
                       f"speculative_ngram={self.speculative_ngram} >= 1")
    if self.cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"cache_dtype={self.cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
    if self.mixed_steps and (self.speculative_k or self.stream is not None):
      raise ValueError("mixed_steps does not run with speculative decoding or a streaming "
                       "cache yet: set mixed_steps=False, or speculative_k=0 and "
                       "stream_window=0")
    if self.stream is not None and self.speculative_k:
      raise ValueError("speculative decoding cannot run on a streaming cache (a rejected "
                       "proposal would roll back a ring that has overwritten its oldest "
                       "tokens): set speculative_k=0 or stream_window=0")


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
  finish_reason: gen.FinishReason | None = None
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
  key: int = -1  # submission number (the same on every process of a lockstep engine)
  adapter: int = 0  # LoRA adapter slot where the params hold a bank (0: the base alone)
  constraint: object | None = None  # a `grammar.Constraint` its tokens must follow
  # The token that ended it (end of sequence or a stop token id; not in `tokens`) and its
  # logprob, which completions' logprobs report.
  stop_token: int | None = None
  stop_logprob: float | None = None

  @property
  def sequence(self) -> list[int]:
    """What the cache must hold before the next draw: the prompt and every produced token."""
    return self.prompt + self.tokens

  @property
  def done(self) -> bool:
    return self.finish_reason is not None


class EngineFailed(RuntimeError):
  """The engine's loop stopped on an error; no request can run."""


class Engine:
  """Continuous batching for one model. Thread-safe `submit`/`cancel`; `step` or
  `run_until_idle` from one thread (or `start()` a background loop)."""

  def __init__(self, graphdef, params, config: EngineConfig = EngineConfig(), *,
               eos_id: int = -1, decode: Callable[[list[int]], str] | None = None,
               draft: speculative.Draft | None = None, lockstep: bool = False):
    """`draft`: what proposes tokens when `config.speculative_k` > 0; prompt lookup over the
    last `config.speculative_ngram` tokens by default, or a model (`speculative.model_draft`,
    `layer_skip_draft`) with the target's vocabulary, which gets its own page pool.

    `lockstep`: one of several processes serving a model whose mesh spans them
    (`jaxllm.inference.lockstep`): process 0 takes requests (`start()`), the others `follow()`.
    """
    self.graphdef, self.params, self.config = graphdef, params, config
    self.lockstep = lockstep
    # Lockstep: what process 0 received since the last step, and every live request by key.
    self._inbox: list[Request] = []
    self._inbox_cancels: list[int] = []
    self._live: dict[int, Request] = {}
    self.model_config = cfg = gen.model_config(graphdef, params)
    # Params holding LoRA banks (`jaxllm.lora.bank`): each request picks a slot, and a step
    # batches requests of different adapters.
    self.adapter_slots = lora_bank.size(params)
    self.eos_id = eos_id
    self.decode_text = decode
    self.max_seq_len = config.max_seq_len or cfg.max_seq_len
    self.stream = config.stream
    if self.stream is None:
      self.max_pages = paging.pages_for(self.max_seq_len, config.page_size)
      what = f"one sequence of max_seq_len {self.max_seq_len}"
    else:
      gen.check_stream(self.stream, self.max_seq_len, cfg)
      # Every streaming request holds exactly these pages, whatever its length.
      self.max_pages = paging.pages_for(self.stream.cache_len(config.prefill_chunk),
                                        config.page_size)
      what = (f"one streaming sequence ({config.sink_tokens} sinks + a ring for "
              f"{config.stream_window} tokens and a {config.prefill_chunk}-token chunk)")
      self.config = config = dataclasses.replace(config, prefix_caching=False)
    if config.num_pages < self.max_pages:
      raise ValueError(f"num_pages={config.num_pages} cannot hold {what} ({self.max_pages} "
                       f"pages of {config.page_size})")
    self.allocator = paging.PageAllocator(config.num_pages)
    self.prefix_cache = prefix_cache_lib.PrefixCache(self.allocator, config.page_size)
    B, V = config.max_slots, cfg.vocab_size
    shape = (cfg.n_layers, config.num_pages, config.page_size, cfg.n_kv_heads, cfg.head_dim)
    # Params placed on a mesh (`placement.place_params`) put the engine there: page pools split
    # over KV heads, every step traced with the mesh in context.
    self.mesh = placement.mesh_of(params)
    self._draft, dk, dv = self._draft_pool(draft)
    # A layer-skip draft shares the target's params, LoRA banks included.
    self._draft_banked = self._draft is not None and lora_bank.size(self._draft.params) > 1
    # The attention window pages are released behind (0: none). A model draft reads the same
    # columns of its own pool, so only what both models' windows have passed goes.
    windows = [cfg.cache_window]
    if self._draft is not None:
      windows.append(gen.model_config(self._draft.graphdef, self._draft.params).cache_window)
    self._window = 0 if 0 in windows else max(windows)
    # Every device array the steps update, one pytree donated into each (`steps.DecodeState`).
    self._state = steps_lib.DecodeState(
        k=placement.zeros_on(self.mesh, shape, config.cache_dtype, paged=True),
        v=placement.zeros_on(self.mesh, shape, config.cache_dtype, paged=True),
        logits_BV=jnp.zeros((B, V), jnp.float32), counts_BV=jnp.zeros((B, V), jnp.int32),
        sub_BV=jnp.zeros((B, V), jnp.float32), dk=dk, dv=dv)
    self._prompt_mask = np.zeros((B, V), bool)
    # Per slot, the tokens its grammar allows next (bitmask words; -1: all), host side.
    self._token_mask = np.full((B, (V + 31) // 32), -1, np.int32)
    self._slots: list[Request | None] = [None] * B
    self._pending: tuple | None = None  # a dispatched decode step's (tokens, logprobs, rows)
    self.failure: Exception | None = None  # what stopped the loop's thread, if anything did
    self._arrays_for: tuple | None = None  # the slot occupants _arrays was built for
    self._arrays = None
    self._bias = None
    self._waiting: collections.deque[Request] = collections.deque()
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._stop = False
    self.stats = collections.Counter()

  @property
  def state(self) -> steps_lib.DecodeState:
    """The device arrays the steps update (page pools, slot logits, counts), as they stand."""
    return self._state

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
    if placement.mesh_of(draft.params) != self.mesh:
      raise ValueError("the draft model must be placed on the target's mesh")
    return (draft, placement.zeros_on(self.mesh, shape, self.config.cache_dtype, paged=True),
            placement.zeros_on(self.mesh, shape, self.config.cache_dtype, paged=True))

  def set_params(self, params) -> None:
    """Serve `params` from the next request on: new weights of the same model (an RL
    policy after an update), used as they are (no copy). The engine must be idle; every
    cached prefix page is dropped (its k and v came from the old weights). ValueError when
    their structure, a shape, dtype or placement differs from the current ones (the compiled
    steps would not fit), or when a model draft reads the old ones."""
    import jax
    if not self.idle:
      raise ValueError("set_params needs an idle engine (requests still running)")
    if self._draft is not None:
      raise ValueError("set_params would leave the speculative draft on the old weights: "
                       "build a new engine with the draft of the new ones")
    old, new = jax.tree.structure(self.params), jax.tree.structure(params)
    if old != new:
      raise ValueError("set_params: the new params' structure differs from the engine's")
    for a, b in zip(jax.tree.leaves(self.params), jax.tree.leaves(params)):
      if (a.shape, a.dtype) != (b.shape, b.dtype):
        raise ValueError(f"set_params: a weight of shape {a.shape} {a.dtype} would become "
                         f"{b.shape} {b.dtype}")
    if placement.mesh_of(params) != self.mesh:
      raise ValueError("set_params: the new params are not on the engine's mesh")
    self.params = params
    self.prefix_cache.clear()

  # ---- requests -------------------------------------------------------------------------

  def submit(self, prompt: Sequence[int], params: sampling.SamplingParams, *,
             request_id: str | None = None, on_token=None, on_finish=None,
             adapter: int = 0, constraint=None) -> Request:
    """`adapter`: the LoRA adapter slot of a bank (`jaxllm.lora.bank`; 0, the base alone).
    `constraint`: a fresh `grammar.Constraint` of this model's vocabulary that the output
    must follow (structured output); the engine's thread drives it from now on."""
    prompt = [int(t) for t in prompt]
    if constraint is not None:
      if self.lockstep:
        raise ValueError("structured output is not supported on a multi-process server yet")
      if constraint.vocabulary.vocab_size != self.model_config.vocab_size:
        raise ValueError(f"the constraint's vocabulary ({constraint.vocabulary.vocab_size}) "
                         f"is not the model's ({self.model_config.vocab_size})")
    if not 0 <= adapter < self.adapter_slots:
      raise ValueError(f"adapter slot {adapter}: this engine holds slots 0 to "
                       f"{self.adapter_slots - 1} (0: the base model)")
    if not prompt:
      raise ValueError("the prompt needs at least one token")
    if min(prompt) < 0 or max(prompt) >= self.model_config.vocab_size:
      raise ValueError(f"prompt has token ids outside [0, {self.model_config.vocab_size})")
    named = [t for t, _ in params.logit_bias] + list(params.stop_token_ids)
    if named and not 0 <= min(named) <= max(named) < self.model_config.vocab_size:
      raise ValueError(f"logit_bias or stop_token_ids name a token outside the vocabulary "
                       f"[0, {self.model_config.vocab_size})")
    if self.stream is None and len(prompt) + params.max_tokens > self.max_seq_len:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                       f"exceeds the context of {self.max_seq_len} tokens")
    if self.failure is not None:
      raise EngineFailed(f"the engine has stopped after an error: {self.failure!r}")
    key = next(self._ids)
    request = Request(request_id or f"req-{key}", prompt, params, on_token=on_token,
                      on_finish=on_finish, key=key, adapter=adapter, constraint=constraint)
    with self._wake:
      # In lockstep the request joins at the next step, on every process at once.
      (self._inbox if self.lockstep else self._waiting).append(request)
      self._wake.notify()
    return request

  def cancel(self, request: Request) -> None:
    """Ends the request at the next step and frees its pages (no-op when already done)."""
    with self._wake:
      if self.lockstep:
        self._inbox_cancels.append(request.key)
      else:
        request.cancelled = True
      self._wake.notify()

  def _sync(self) -> None:
    """Lockstep: every process applies process 0's arrivals, cancellations and shutdown."""
    from jaxllm.inference import lockstep
    leader = lockstep.is_leader()
    with self._lock:
      arrived, events = [], None
      if leader:
        arrived, self._inbox = self._inbox, []
        events = lockstep.Events(
            [lockstep.request_event(r.id, r.prompt, r.params, r.arrival, r.key, r.adapter)
             for r in arrived], self._inbox_cancels, self._stop)
        self._inbox_cancels = []
    events = lockstep.exchange(events)
    if not leader:
      arrived = [Request(e["id"], e["prompt"], lockstep.params_from_event(e["params"]),
                         arrival=e["arrival"], key=e["key"], adapter=e.get("adapter", 0))
                 for e in events.submitted]
    with self._lock:
      for r in arrived:
        self._waiting.append(r)
        self._live[r.key] = r
      for key in events.cancelled:
        if key in self._live:
          self._live[key].cancelled = True
      self._stop = self._stop or events.stop

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
    P = self.config.page_size
    held = {p for s in self._slots if s is not None for p in s.pages if p != paging.RELEASED}
    released = lambda s: sum(p == paging.RELEASED for p in s.pages) * P
    tokens = sum(min(len(s.sequence) + s.inflight, len(s.pages) * P) - released(s)
                 for s in self._slots if s is not None)
    return tokens / max(len(held) * self.config.page_size, 1)

  # ---- the loop ---------------------------------------------------------------------------

  def step(self) -> bool:
    """One scheduling iteration; returns whether there was anything to do."""
    with placement.in_mesh(self.mesh):
      return self._step()

  def _step(self) -> bool:
    if self.lockstep:
      self._sync()
    with self._lock:
      self._drop_cancelled()
      self._admit()
    if all(s is None for s in self._slots):
      self._collect()  # a step whose requests have all ended since
      return bool(self._waiting)
    if self.config.mixed_steps and self._prefilling():
      self._mixed_step()
    else:
      self._prefill_chunks()
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
          while self.idle and not self._stop and not self._inbox and not self._inbox_cancels:
            # In lockstep an idle leader still steps now and then, so the followers waiting in
            # the step's broadcast hear from it (and collectives do not time out).
            if not self._wake.wait(timeout=LOCKSTEP_HEARTBEAT_S if self.lockstep else None):
              break
        if not self._stop:
          try:
            self.step()
          except Exception as e:  # noqa: BLE001 - every request must hear of it, not hang
            self._fail(e)
            return
      if self.lockstep:
        self.step()  # tells the followers to stop
    self._thread = threading.Thread(target=loop, name="jaxllm-engine", daemon=True)
    self._thread.start()

  def _fail(self, error: Exception) -> None:
    """The loop's step raised: every unfinished request ends with finish_reason "error" (its
    caller hears at once instead of waiting forever) and later submissions are refused."""
    logging.exception("jaxllm engine step failed; the engine has stopped")
    with self._wake:
      self.failure = error
      self._stop = True
      unfinished = [*self._waiting, *(r for r in self._slots if r is not None),
                    *self._live.values()]
      self._waiting.clear()
    seen = set()
    for r in unfinished:
      if not r.done and id(r) not in seen:
        seen.add(id(r))
        r.finish_reason = "error"
        if r.on_finish is not None:
          r.on_finish(r)

  def follow(self) -> None:
    """Lockstep, processes other than 0: run process 0's steps until it shuts down."""
    if not self.lockstep:
      raise ValueError("only a lockstep engine follows")
    while not self._stop:
      self.step()

  def shutdown(self) -> None:
    with self._wake:
      self._stop = True
      self._wake.notify()
    if self._thread is not None:
      self._thread.join()

  # ---- scheduling -------------------------------------------------------------------------

  def _free_pages(self, request: Request) -> None:
    self.allocator.release([p for p in request.pages if p != paging.RELEASED])
    request.pages = []

  def _release_out_of_window(self) -> None:
    """A sliding-window model's decoding requests give back the pages no later query can see:
    every slot of page i is below the next token's window once (i + 1) * P <= n - W + 1, for n
    tokens cached (a speculative rollback never goes below n). The page-table entries stay, as
    RELEASED, so positions keep their columns; attention never reads them (the kernels start at
    the window's first page, the XLA path masks them). Prefill keeps its pages until the prompt
    is done (so the prefix cache can register them)."""
    W, P = self._window, self.config.page_size
    if not W or self.stream is not None:  # a streaming ring reuses its pages instead
      return
    for r in self._slots:
      if r is None or r.prefilled < len(r.sequence):
        continue
      dead = min(max(r.prefilled - W + 1, 0) // P, len(r.pages))
      gone = [p for p in r.pages[:dead] if p != paging.RELEASED]
      if gone:
        self.allocator.release(gone)
        r.pages[:dead] = [paging.RELEASED] * dead
        self.stats["window_pages_released"] += len(gone)

  def _finish(self, request: Request, reason: str) -> None:
    request.finish_reason = reason
    self._live.pop(request.key, None)
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
      shared = (self.prefix_cache.lookup(seq, request.adapter) if self.config.prefix_caching
                else [])
      need = (paging.pages_for(len(seq), self.config.page_size) - len(shared)
              if self.stream is None else self.max_pages)
      # Admission never preempts: a request waits for pages rather than evicting a runner.
      if self.allocator.num_free < need:
        self.prefix_cache.evict(need - self.allocator.num_free)
      if (self.allocator.num_free < need
          or self._prefix_being_written(seq, len(shared), request.adapter)):
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
        request.prefix_keys = frozenset(self.prefix_cache.keys(
            request.prompt, len(request.prompt) // P, request.adapter))

  def _prefix_being_written(self, seq: list[int], cached: int, adapter: int) -> bool:
    """Whether a running request is prefilling the prompt page that would extend `seq`'s
    cached prefix. Waiting for it costs nothing (prefill runs oldest first, so this request
    could not start before it anyway) and saves recomputing the page: requests arriving
    together with one system prompt compute it once."""
    if not self.config.prefix_caching or cached >= (len(seq) - 1) // self.config.page_size:
      return False
    key = self.prefix_cache.keys(seq, cached + 1, adapter)[-1]
    return any(key in r.prefix_keys for r in self._slots
               if r is not None and r.prefilled < len(r.sequence))

  def _table_width(self, pages: int) -> int:
    """Page-table columns for `pages` pages: a power of two, so attention reads (and gathers)
    what the longest sequence holds, not max_seq_len, with a handful of compiled widths.
    Streaming rows all hold max_pages: their ring spans exactly those pages' slots."""
    if self.stream is not None:
      return self.max_pages
    return min(gen.bucket(pages, minimum=1), self.max_pages)

  def _prefill_chunks(self) -> None:
    """The oldest requests still prefilling, up to `config.prefill_rows` of them, advance by
    one chunk each in one call (rows past the pending ones write nothing)."""
    pending = self._prefilling()[:self.config.prefill_rows]
    if not pending:
      return
    R, C = self.config.prefill_rows, self.config.prefill_chunk
    width = self._table_width(max(len(r.pages) for r in pending))
    table = np.zeros((R, width), np.int32)
    table[:len(pending)] = paging.page_table_array([r.pages for r in pending], width)
    lengths, tokens, num_new = (np.zeros(R, np.int32), np.zeros((R, C), np.int32),
                                np.zeros(R, np.int32))
    for i, r in enumerate(pending):
      chunk = r.sequence[r.prefilled:r.prefilled + C]
      tokens[i, :len(chunk)], lengths[i], num_new[i] = chunk, r.prefilled, len(chunk)
    args = (jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(tokens), jnp.asarray(num_new))
    adapter = None
    if self.adapter_slots > 1:
      adapter = jnp.asarray([r.adapter for r in pending] + [0] * (R - len(pending)), jnp.int32)
    draft = self._draft
    logits, self._state = steps_lib.prefill_chunk(
        self.graphdef, self.params, self._state, *args, adapter,
        None if draft is None else draft.graphdef, None if draft is None else draft.params,
        adapter if self._draft_banked else None, stream=self.stream)
    for i, request in enumerate(pending):
      request.prefilled += int(num_new[i])
      self.stats["prefill_tokens"] += int(num_new[i])
      if request.prefilled == len(request.sequence):
        self._prefilled(request, logits[i])

  def _prefilled(self, request: Request, logits_V) -> None:
    """A request's whole sequence is in the cache: its slot's next draw reads `logits_V`."""
    state = self._state
    self._state = state._replace(logits_BV=state.logits_BV.at[request.slot].set(logits_V),
                                 sub_BV=state.sub_BV.at[request.slot].set(0.0))
    self._prefill_done(request)

  def _prefill_done(self, request: Request) -> None:
    """What follows a completed prefill besides the slot's logits: its penalty counts (a
    request recomputed after preemption has some) and its prompt pages in the prefix cache."""
    if request.tokens:  # recomputed after preemption: restore the penalty counts too
      counts = jnp.asarray(np.bincount(request.tokens, minlength=self.model_config.vocab_size),
                           jnp.int32)
    else:
      counts = 0
    self._state = self._state._replace(
        counts_BV=self._state.counts_BV.at[request.slot].set(counts))
    if self.config.prefix_caching:
      self.prefix_cache.register(request.prompt, request.pages, request.adapter)

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
      if self.stream is None and r.prefilled + 1 > len(r.pages) * self.config.page_size:
        pages = self._allocate(1, r)
        if pages is None:
          self._preempt(r)
          continue
        r.pages += pages
    return self._ready()

  def _slot_adapters(self) -> jnp.ndarray | None:
    """Each slot's adapter slot [B] (empty slots: 0) where the params hold banks, else None."""
    if self.adapter_slots == 1:
      return None
    return jnp.asarray([0 if r is None else r.adapter for r in self._slots], jnp.int32)

  def _batch(self, table, lengths, active, steps, adapters, mask) -> steps_lib.Batch:
    """A step's `steps.Batch` from its host arrays and the slots' sampling state."""
    return steps_lib.Batch(
        page_table_BM=jnp.asarray(table), lengths_B=jnp.asarray(lengths),
        active_B=jnp.asarray(active), steps_B=jnp.asarray(steps), arrays=self._arrays,
        prompt_mask_BV=jnp.asarray(self._prompt_mask), adapters_B=adapters,
        bias_BV=self._bias, mask_BW=mask)

  def _batch_arrays(self, ready: list[Request], width: int):
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

  def _decode_step(self) -> None:
    self._release_out_of_window()
    ready, mask = self._drawable(self._grow_pages(), self.config.speculative_k > 0)
    if self.config.speculative_k:
      if ready:
        self._speculative_step(ready, mask)
      return
    previous, self._pending = self._pending, None
    if ready:
      width = self._table_width(max(len(r.pages) for r in ready))
      table, lengths, active, steps = self._batch_arrays(ready, width)
      batch = self._batch(table, lengths, active, steps, self._slot_adapters(), mask)
      tok, logp, self._state = steps_lib.decode(self.graphdef, self.params, self._state, batch,
                                                penalties=self._penalties, stream=self.stream)
      self._fed(ready, tok, logp)
    self._after_dispatch(previous)

  def _drawable(self, ready: list[Request], in_lockstep: bool):
    """(the ready requests still running, the step's grammar mask or None): the slots'
    sampling arrays refreshed, and the last step's tokens read first where the step needs
    them (`in_lockstep`: speculative proposals are verified against every token; a grammar's
    mask follows from them)."""
    self._refresh_arrays()
    constrained = any(r.constraint is not None or self._below_min_tokens(r) for r in ready)
    if in_lockstep or constrained:
      self._collect()
      ready = self._ready()
    mask = self._grammar_masks(ready) if constrained else None
    return [r for r in ready if not r.done], mask

  def _fed(self, ready: list[Request], tok, logp) -> None:
    """A decode step for `ready` is dispatched: each one's drawn token is fed and stored by
    it, and its tokens (`tok`, `logp`) wait to be read while the next step runs."""
    self.stats["decode_steps"] += 1
    for r in ready:
      r.prefilled += 1
      r.inflight += 1
    self._pending = (tok, logp, [(r, r.slot, r.preemptions) for r in ready])

  def _after_dispatch(self, previous) -> None:
    """The device runs the step just dispatched while the host reads and hands out the last
    (`previous`), unless overlap is off."""
    if previous is not None:
      self._emit_step(previous)
    if not self.config.overlap:
      self._collect()

  def _prefilling(self) -> list[Request]:
    """Requests holding a slot whose sequence is not all in the cache yet, oldest first."""
    return sorted((r for r in self._slots if r is not None and r.prefilled < len(r.sequence)),
                  key=lambda r: r.arrival)

  def _mixed_step(self) -> None:
    """One ragged step (`steps.mixed`): the ready slots decode, and up to `prefill_chunk`
    prompt tokens of the oldest prefilling requests go through the same pass. With nothing to
    decode, the plain prefill chunk (denser) runs instead."""
    self._release_out_of_window()
    ready = self._grow_pages()
    if not ready:
      self._prefill_chunks()
      self._decode_step()
      return
    ready, mask = self._drawable(ready, in_lockstep=False)
    B, P = self.config.max_slots, self.config.prefill_chunk
    rows, budget = [], P  # (request, first position, tokens) of the prompt rows
    for r in self._prefilling():
      n = min(budget, len(r.sequence) - r.prefilled)
      rows.append((r, r.prefilled, n))
      budget -= n
      if not budget:
        break
    width = self._table_width(max(len(r.pages) for r in [*ready, *(r for r, _, _ in rows)]))
    table_B, lengths_B, active_B, steps = self._batch_arrays(ready, width)
    N = B + P
    table, lengths, active = (np.zeros((N, width), np.int32), np.zeros(N, np.int32),
                              np.zeros(N, bool))
    table[:B], lengths[:B], active[:B] = table_B, lengths_B, active_B
    tokens, ends = np.zeros(P, np.int32), np.full(P, B, np.int32)
    adapters = None
    if self.adapter_slots > 1:
      adapters = np.zeros(N, np.int32)
      adapters[:B] = [0 if r is None else r.adapter for r in self._slots]
    at = 0
    for r, first, n in rows:
      span = slice(B + at, B + at + n)
      table[span] = paging.page_table_array([r.pages], width)[0]
      lengths[span] = first + np.arange(n)
      active[span] = True
      tokens[at:at + n] = r.sequence[first:first + n]
      if adapters is not None:
        adapters[span] = r.adapter
      if first + n == len(r.sequence):
        ends[at + n - 1] = r.slot
      at += n
    previous, self._pending = self._pending, None
    batch = self._batch(table, lengths, active, steps,
                        None if adapters is None else jnp.asarray(adapters), mask)
    tok, logp, self._state = steps_lib.mixed(self.graphdef, self.params, self._state, batch,
                                             jnp.asarray(tokens), jnp.asarray(ends),
                                             penalties=self._penalties)
    self.stats["mixed_steps"] += 1
    for r, first, n in rows:
      r.prefilled += n
      self.stats["prefill_tokens"] += n
      if r.prefilled == len(r.sequence):
        self._prefill_done(r)
    if ready:
      self._fed(ready, tok, logp)
    else:
      self.stats["decode_steps"] += 1
    self._after_dispatch(previous)

  def _below_min_tokens(self, r: Request) -> bool:
    """Whether the request's next draw must not end it (min_tokens not reached yet)."""
    return len(r.tokens) + r.inflight < r.params.min_tokens

  def _grammar_masks(self, ready: list[Request]):
    """The `[B, W]` token bitmask of this step on the device: each constrained ready slot's
    grammar's next tokens, all tokens elsewhere; without the end of sequence and the stop
    tokens for a request below its min_tokens. A grammar that allows nothing ends its request
    here (grammar_dead_end)."""
    start = time.perf_counter()
    self._token_mask[:] = -1
    for r in ready:
      if r.done:
        continue
      row = self._token_mask[r.slot]
      if r.constraint is not None and not r.constraint.fill(row):
        logging.warning("request %s: its grammar allows no next token (%s)", r.id,
                        r.constraint.error or "a dead end")
        row[:] = -1
        self._finish(r, "grammar_dead_end")
        continue
      if self._below_min_tokens(r):
        ends = [*r.params.stop_token_ids, *([self.eos_id] if self.eos_id >= 0 else [])]
        for t in ends:  # clear token t's bit (int32 words: flip through uint32)
          row.view(np.uint32)[t // 32] &= ~np.uint32(1 << (t % 32))
    self.stats["grammar_mask_s"] += time.perf_counter() - start
    return jnp.asarray(self._token_mask)

  def _collect(self) -> None:
    """Emits the tokens of the decode step still in flight, if any."""
    pending, self._pending = self._pending, None
    if pending is not None:
      self._emit_step(pending)

  def _emit_step(self, pending: tuple) -> None:
    """Reads a dispatched decode step's tokens and emits them to the requests that still hold
    the slot they had then; the others ended or were preempted since."""
    tok, logp, rows = pending
    tok, logp = placement.to_host((tok, logp))
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
      self._bias = None  # [B, V] on the device while some slot's request has a logit_bias
      if any(p.logit_bias for p in params):
        bias = np.zeros((len(params), self.model_config.vocab_size), np.float32)
        for row, p in enumerate(params):
          for t, b in p.logit_bias:
            bias[row, t] = b
        self._bias = jnp.asarray(bias)

  def _emit(self, r: Request, t: int, logp: float, now: float) -> bool:
    """Hands one produced token to its request; returns whether the request goes on."""
    if (t == self.eos_id and not r.params.ignore_eos) or t in r.params.stop_token_ids:
      r.stop_token, r.stop_logprob = t, logp
      self._finish(r, "stop")
      return False
    if r.constraint is not None and not r.constraint.consume(t):
      # The step's mask allowed only what the grammar did: a token outside it is a bug.
      logging.error("request %s: token %d is outside its grammar (%s)", r.id, t,
                    r.constraint.error)
      self._finish(r, "grammar_dead_end")
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
    if r.constraint is not None and r.constraint.finished:  # the text is complete
      self._finish(r, "stop")
      return False
    if len(r.tokens) >= r.params.max_tokens:
      self._finish(r, "length")
      return False
    return True

  def _speculative_step(self, ready: list[Request], mask) -> None:
    """Decodes with proposals; each slot emits 1 + (accepted proposals) tokens.

    A slot proposes only as many tokens as its pages, max_tokens and the context have room
    for (none when it uses penalties, whose counts the step keeps for one token, nor with a
    logit bias, a grammar or min_tokens to reach, which the step applies to its first token
    only); pages for proposals come from the free list (and the prefix cache) only, never by
    preempting another request. `mask`: the step's token bitmask, or None.
    """
    k, P = self.config.speculative_k, self.config.page_size
    drafts = np.zeros((self.config.max_slots,), np.int32)
    for r in ready:
      plain = not (r.params.uses_penalties or r.params.logit_bias or r.constraint is not None
                   or self._below_min_tokens(r))
      want = 0 if not plain else min(
          k, r.params.max_tokens - len(r.tokens) - 1, self.max_seq_len - r.prefilled - 1)
      extra = paging.pages_for(r.prefilled + 1 + max(want, 0), P) - len(r.pages)
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
    batch = self._batch(table, lengths, active, steps, self._slot_adapters(), mask)
    tokens, logp, n_acc, self._state = steps_lib.decode_speculative(
        self.graphdef, self.params, draft.graphdef, draft.params, self._state, batch, hist,
        jnp.asarray(drafts), k=k, max_ngram=self.config.speculative_ngram,
        penalties=self._penalties)
    tokens, logp, n_acc = placement.to_host((tokens, logp, n_acc))
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
