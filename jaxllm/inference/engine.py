"""Continuous batching over a paged KV cache (vLLM-style), driven by a host loop.

Three parts, each with one job: the `scheduler.Scheduler` decides which requests hold the
`max_slots` decode slots and their pages (admission, page growth, preemption, the prefix
cache); the `runner.Runner` holds the device state (one page pool per layer `[L, N, P, K, Dh]`
shared by the slots, and per slot the logits its next token will be drawn from:
`steps.DecodeState`, one pytree) and runs the jitted steps of `jaxllm.inference.steps`, each
with fixed shapes (the page table's width is rounded up to a power of two, so there are at
most log2(max pages per sequence) + 1 variants of each); the `Engine` takes requests from any
thread and, in `Engine.step`, has the scheduler admit, runs at most one prefill chunk beside
the decode step (so running streams keep flowing while long prompts come in; with
`mixed_steps` the chunk's tokens ride in the decode step itself, `steps.mixed`), streams
tokens, applies stop tokens / stop strings / max_tokens / grammars, and frees pages the
moment a request ends. Offline generation (`generate.generate_requests`,
`speculative.speculative_generate`) runs the same decode and speculative step functions in a
device loop.
Since the device feeds each drawn token itself, the host dispatches decode step n + 1 before it
reads step n's tokens (`EngineConfig.overlap`, on accelerators by default): its bookkeeping runs
while the device works, and a request that stopped at step n only wastes its row of step n + 1.
`Engine.step_times` counts the host's time per part of the steps (`STEP_PARTS`).

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
a mask). Such steps run in lockstep. On a speculative engine a constrained request proposes
tokens the host has checked against its grammar, with the grammar's mask at each position,
and the step keeps each while plain decoding's own draw there equals it: the output is plain
constrained decoding's, token for token.
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
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import KV_CACHE_DTYPES
from jaxllm.inference import generate as gen
from jaxllm.inference import paging, sampling, speculative
from jaxllm.inference import runner as runner_lib
from jaxllm.inference import scheduler as scheduler_lib
from jaxllm.inference import steps as steps_lib
from jaxllm.inference.scheduler import Request
from jaxllm.model import cache as kv_cache
from jaxllm.parallel import placement

__all__ = ["Engine", "EngineConfig", "EngineFailed", "Request", "generate_all"]


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
  # None: overlap on an accelerator, lockstep on the CPU backend, where the "device" is the
  # host's own cores: the bookkeeping there competes with the step's threads instead of hiding
  # behind them (SmolLM2 on 2 cores: 7.7 ms of host work a step overlapped against 0.8 ms in
  # lockstep; overlapped / lockstep throughput 0.92-1.09x over 4 rounds, median 0.95;
  # docs/benchmarks.md).
  overlap: bool | None = None
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


# The parts of an engine step `Engine.step_times` counts: taking arrivals and admitting
# (`admit`), dispatching prefill chunks (`prefill`), building a decode step's host arrays
# (`schedule`: pages, sampling arrays, grammar masks, the batch), dispatching it (`dispatch`),
# waiting for a step's tokens to reach the host (`wait`: the device's time the host did not
# hide) and handing them to their requests (`emit`: stops, streaming callbacks, grammars).
STEP_PARTS = ("admit", "prefill", "schedule", "dispatch", "wait", "emit")


def default_overlap(params) -> bool:
  """`EngineConfig.overlap` unset: whether the host overlaps the device for params held where
  they are (on an accelerator, not on the CPU backend)."""
  leaves = jax.tree.leaves(params)
  if leaves and isinstance(leaves[0], jax.Array):
    return next(iter(leaves[0].devices())).platform != "cpu"
  return jax.default_backend() != "cpu"


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
    draft, config = runner_lib.check_draft(draft, config)
    self.lockstep = lockstep
    # Lockstep: what process 0 received since the last step, and every live request by key.
    self._inbox: list[Request] = []
    self._inbox_cancels: list[int] = []
    self._live: dict[int, Request] = {}
    self.model_config = cfg = gen.model_config(graphdef, params)
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
      config = dataclasses.replace(config, prefix_caching=False)
    if config.num_pages < self.max_pages:
      raise ValueError(f"num_pages={config.num_pages} cannot hold {what} ({self.max_pages} "
                       f"pages of {config.page_size})")
    self.config = config
    self.overlap = config.overlap
    if self.overlap is None:
      self.overlap = default_overlap(params)
    self.stats = collections.Counter()
    # Host seconds spent per part of the steps (`STEP_PARTS`), for the serving bench's
    # breakdown of a step; a few clock reads a step.
    self.step_times = collections.Counter()
    self._timing: tuple[str, float] | None = None  # the part being timed, since when
    self.runner = runner_lib.Runner(graphdef, params, config, max_seq_len=self.max_seq_len,
                                    draft=draft)
    self.scheduler = scheduler_lib.Scheduler(
        config, max_pages=self.max_pages, max_seq_len=self.max_seq_len,
        streaming=self.stream is not None, window=self.runner.cache_window, stats=self.stats)
    # Per slot, the tokens its grammar allows next (bitmask words; -1: all), host side.
    self._token_mask = np.full((config.max_slots, (cfg.vocab_size + 31) // 32), -1, np.int32)
    self._pending: tuple | None = None  # a dispatched decode step's (tokens, logprobs, rows)
    self.failure: Exception | None = None  # what stopped the loop's thread, if anything did
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._stop = False

  # What callers read of the parts.
  graphdef = property(lambda self: self.runner.graphdef)
  params = property(lambda self: self.runner.params)
  adapter_slots = property(lambda self: self.runner.adapter_slots)
  mesh = property(lambda self: self.runner.mesh)
  allocator = property(lambda self: self.scheduler.allocator)
  prefix_cache = property(lambda self: self.scheduler.prefix_cache)

  @property
  def state(self) -> steps_lib.DecodeState:
    """The device arrays the steps update (page pools, slot logits, counts), as they stand."""
    return self.runner.state

  def set_params(self, params) -> None:
    """Serve `params` from the next request on: new weights of the same model (an RL
    policy after an update), used as they are (no copy). The engine must be idle; every
    cached prefix page is dropped (its k and v came from the old weights). ValueError when
    their structure, a shape, dtype or placement differs from the current ones (the compiled
    steps would not fit), or when a model draft reads the old ones."""
    if not self.idle:
      raise ValueError("set_params needs an idle engine (requests still running)")
    self.runner.set_params(params)
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
      (self._inbox if self.lockstep else self.scheduler.waiting).append(request)
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
        self.scheduler.waiting.append(r)
        self._live[r.key] = r
      for key in events.cancelled:
        if key in self._live:
          self._live[key].cancelled = True
      self._stop = self._stop or events.stop

  @property
  def idle(self) -> bool:
    return not self.scheduler.waiting and not self.scheduler.running and self._pending is None

  def metrics(self) -> dict:
    return dict(queue_depth=len(self.scheduler.waiting),
                active_slots=len(self.scheduler.running),
                pages_in_use=self.allocator.num_pages - self.allocator.num_free,
                pages_total=self.allocator.num_pages, prefix_cached_pages=len(self.prefix_cache),
                **self.stats)

  def kv_utilisation(self) -> float:
    """Tokens the running requests keep in the cache (prompt and output so far, whether or not
    prefill has reached them yet) / capacity of the pages they hold."""
    return self.scheduler.kv_utilisation()

  # ---- the loop ---------------------------------------------------------------------------

  def step(self) -> bool:
    """One scheduling iteration; returns whether there was anything to do."""
    with placement.in_mesh(self.mesh):
      return self._step()

  @contextlib.contextmanager
  def _timed(self, part: str):
    """Counts the block's time to `part`, less the time of parts timed inside it (a lockstep
    step's `wait` inside its `schedule`): each second goes to one part."""
    now = time.perf_counter()
    outer = self._timing
    if outer is not None:
      self.step_times[outer[0]] += now - outer[1]
    self._timing = (part, now)
    try:
      yield
    finally:
      end = time.perf_counter()
      self.step_times[part] += end - self._timing[1]
      self._timing = None if outer is None else (outer[0], end)

  def _step(self) -> bool:
    with self._timed("admit"):
      if self.lockstep:
        self._sync()
      with self._lock:
        self._drop_cancelled()
        for r in self.scheduler.admit():
          self.runner.start_slot(r.slot, r.prompt)
    if not self.scheduler.running:
      self._collect()  # a step whose requests have all ended since
      return bool(self.scheduler.waiting)
    if self.config.mixed_steps and self.scheduler.prefilling():
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
      unfinished = [*self.scheduler.waiting, *self.scheduler.running, *self._live.values()]
      self.scheduler.waiting.clear()
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

  # ---- requests ending --------------------------------------------------------------------

  def _finish(self, request: Request, reason: str) -> None:
    request.finish_reason = reason
    self._live.pop(request.key, None)
    self.scheduler.release(request)
    self.stats["finished"] += 1
    if request.on_finish is not None:
      request.on_finish(request)

  def _drop_cancelled(self) -> None:
    waiting = self.scheduler.waiting
    for r in [r for r in waiting if r.cancelled]:
      waiting.remove(r)
      self._finish(r, "cancelled")
    for r in self.scheduler.running:
      if r.cancelled:
        self._finish(r, "cancelled")

  # ---- steps ------------------------------------------------------------------------------

  def _prefill_chunks(self) -> None:
    """The oldest requests still prefilling, up to `config.prefill_rows` of them, advance by
    one chunk each in one call (rows past the pending ones write nothing)."""
    pending = self.scheduler.prefilling()[:self.config.prefill_rows]
    if not pending:
      return
    C = self.config.prefill_chunk
    chunks = [r.sequence[r.prefilled:r.prefilled + C] for r in pending]
    with self._timed("prefill"):
      logits = self.runner.prefill([r.pages for r in pending], [r.prefilled for r in pending],
                                   chunks, [r.adapter for r in pending],
                                   self.scheduler.table_width(pending))
      if not self.overlap:  # in lockstep the chunk's device time is the prefill's own
        jax.block_until_ready(logits)
    for i, request in enumerate(pending):
      request.prefilled += len(chunks[i])
      self.stats["prefill_tokens"] += len(chunks[i])
      if request.prefilled == len(request.sequence):
        self.runner.set_logits(request.slot, logits[i])
        self._prefill_done(request)

  def _prefill_done(self, request: Request) -> None:
    """What follows a completed prefill besides the slot's logits: its penalty counts (a
    request recomputed after preemption has some) and its prompt pages in the prefix cache."""
    self.runner.set_counts(request.slot, request.tokens)
    if self.config.prefix_caching:
      self.prefix_cache.register(request.prompt, request.pages, request.adapter)

  def _slot_adapters(self) -> jax.Array | None:
    """Each slot's adapter slot [B] (empty slots: 0) where the params hold banks, else None."""
    return self.runner.adapters([0 if r is None else r.adapter for r in self.scheduler.slots])

  def _decode_step(self) -> None:
    with self._timed("schedule"):
      self.scheduler.release_out_of_window()
      ready, mask = self._drawable(self.scheduler.grow_pages(), self.config.speculative_k > 0)
    if self.config.speculative_k:
      if ready:
        self._speculative_step(ready, mask)
      return
    previous, self._pending = self._pending, None
    if ready:
      with self._timed("schedule"):
        width = self.scheduler.table_width(ready)
        batch = self.runner.batch(*self.scheduler.batch_arrays(ready, width),
                                  self._slot_adapters(), mask)
      with self._timed("dispatch"):
        tok, logp = self.runner.decode(batch)
      self._fed(ready, tok, logp)
    self._after_dispatch(previous)

  def _drawable(self, ready: list[Request], in_lockstep: bool):
    """(the ready requests still running, the step's grammar mask or None): the slots'
    sampling arrays refreshed, and the last step's tokens read first where the step needs
    them (`in_lockstep`: speculative proposals are verified against every token; a grammar's
    mask follows from them)."""
    self.runner.refresh_sampling([None if r is None else r.params
                                  for r in self.scheduler.slots])
    constrained = any(r.constraint is not None or self._below_min_tokens(r) for r in ready)
    if in_lockstep or constrained:
      self._collect()
      ready = self.scheduler.ready()
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
    (`previous`), unless the engine runs in lockstep (`EngineConfig.overlap`)."""
    if previous is not None:
      self._emit_step(previous)
    if not self.overlap:
      self._collect()

  def _mixed_step(self) -> None:
    """One ragged step (`steps.mixed`): the ready slots decode, and up to `prefill_chunk`
    prompt tokens of the oldest prefilling requests go through the same pass. With nothing to
    decode, the plain prefill chunk (denser) runs instead."""
    self.scheduler.release_out_of_window()
    ready = self.scheduler.grow_pages()
    if not ready:
      self._prefill_chunks()
      self._decode_step()
      return
    ready, mask = self._drawable(ready, in_lockstep=False)
    B, P = self.config.max_slots, self.config.prefill_chunk
    rows, budget = [], P  # (request, first position, tokens) of the prompt rows
    for r in self.scheduler.prefilling():
      n = min(budget, len(r.sequence) - r.prefilled)
      rows.append((r, r.prefilled, n))
      budget -= n
      if not budget:
        break
    width = self.scheduler.table_width([*ready, *(r for r, _, _ in rows)])
    table_B, lengths_B, active_B, steps = self.scheduler.batch_arrays(ready, width)
    N = B + P
    table, lengths, active = (np.zeros((N, width), np.int32), np.zeros(N, np.int32),
                              np.zeros(N, bool))
    table[:B], lengths[:B], active[:B] = table_B, lengths_B, active_B
    tokens, ends = np.zeros(P, np.int32), np.full(P, B, np.int32)
    adapters = np.zeros(N, np.int32)
    adapters[:B] = [0 if r is None else r.adapter for r in self.scheduler.slots]
    at = 0
    for r, first, n in rows:
      span = slice(B + at, B + at + n)
      table[span] = paging.page_table_array([r.pages], width)[0]
      lengths[span] = first + np.arange(n)
      active[span] = True
      tokens[at:at + n] = r.sequence[first:first + n]
      adapters[span] = r.adapter
      if first + n == len(r.sequence):
        ends[at + n - 1] = r.slot
      at += n
    previous, self._pending = self._pending, None
    batch = self.runner.batch(table, lengths, active, steps, self.runner.adapters(adapters),
                              mask)
    with self._timed("dispatch"):
      tok, logp = self.runner.mixed(batch, tokens, ends)
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
        self._hold_off_end(r, row)
    self.stats["grammar_mask_s"] += time.perf_counter() - start
    return jnp.asarray(self._token_mask)

  def _hold_off_end(self, r: Request, row_W: np.ndarray) -> None:
    """Clears the end of sequence and the request's stop tokens from a mask row."""
    for t in [*r.params.stop_token_ids, *([self.eos_id] if self.eos_id >= 0 else [])]:
      row_W.view(np.uint32)[t // 32] &= ~np.uint32(1 << (t % 32))  # int32 words: via uint32

  def _checks_proposals(self, r: Request) -> bool:
    """Whether a speculative step verifies grammar-checked proposals for this request (one
    under a grammar, without penalties)."""
    return (self.config.speculative_k > 0 and r.constraint is not None
            and not r.params.uses_penalties)

  def _grammar_proposals(self, rows: list[tuple[Request, int]]) -> dict:
    """Proposals for requests under a grammar, each `(request, at most n)`: the token its next
    draw gives where the last step drew it, then what its grammar forces after that, then
    prompt lookup's continuation, walked through the grammar and cut at the first token it
    does not allow (or where it ends). Returns {slot: (tokens, masks `[1 + k, W]`: the
    grammar's mask before each token and after the last where the grammar goes on, else -1,
    whether that last mask is real)} for the requests with any."""
    start = time.perf_counter()
    k = self.config.speculative_k
    heads = {}
    for r, n in rows:
      c = r.constraint
      head = [] if r.known_next is None else [r.known_next]
      if head and not c.allows(head[0]):
        head = []
      walked = sum(c.consume(t) for t in head)
      heads[r.slot] = (head + c.forced_tokens())[:n]
      c.rollback(walked)
    # Fixed shapes, as every step's: a row per slot, a power-of-two history.
    H = gen.bucket(max(len(r.sequence) + len(heads[r.slot]) for r, _ in rows) + 1)
    hist = np.zeros((self.config.max_slots, H), np.int32)
    lengths = np.ones(self.config.max_slots, np.int32)
    for i, (r, _) in enumerate(rows):
      seq = r.sequence + heads[r.slot]
      hist[i, :len(seq)], lengths[i] = seq, len(seq)
    looked = self.runner.lookup(hist, lengths, k)
    out = {}
    for i, (r, n) in enumerate(rows):
      c, ends = r.constraint, {*r.params.stop_token_ids, self.eos_id}
      wanted = (heads[r.slot] + [t for t in looked[i].tolist() if t >= 0])[:n]
      masks = np.full((k + 1, self._token_mask.shape[1]), -1, np.int32)
      masks[0] = self._token_mask[r.slot]  # the step's own mask, min_tokens included
      taken, walked, last_real = [], 0, True
      for t in wanted:
        if not masks[len(taken)].view(np.uint32)[t // 32] >> np.uint32(t % 32) & 1:
          break
        taken.append(t)
        if t in ends:
          last_real = False
          break
        walked += c.consume(t)  # allowed by the mask just filled from the same state
        row = masks[len(taken)]
        if c.finished or not c.fill(row):
          row[:], last_real = -1, False
          break
        if len(r.tokens) + len(taken) < r.params.min_tokens:
          self._hold_off_end(r, row)
      c.rollback(walked)
      if taken:
        out[r.slot] = (taken, masks, last_real)
    self.stats["grammar_mask_s"] += time.perf_counter() - start
    return out

  def _collect(self) -> None:
    """Emits the tokens of the decode step still in flight, if any."""
    pending, self._pending = self._pending, None
    if pending is not None:
      self._emit_step(pending)

  def _emit_step(self, pending: tuple) -> None:
    """Reads a dispatched decode step's tokens and emits them to the requests that still hold
    the slot they had then; the others ended or were preempted since."""
    tok, logp, rows = pending
    with self._timed("wait"):
      tok, logp = placement.to_host((tok, logp))
    with self._timed("emit"):
      now = time.monotonic()
      for r, slot, epoch in rows:
        if r.done or r.slot != slot or r.preemptions != epoch:
          continue
        r.inflight -= 1
        self._emit(r, int(tok[slot]), float(logp[slot]), now)

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
    preempting another request. A request under a grammar (without penalties) proposes
    instead from its next draw on, tokens checked against its grammar
    (`_grammar_proposals`), and emits 0 to that many. `mask`: the step's token bitmask, or
    None.
    """
    k, P = self.config.speculative_k, self.config.page_size
    drafts = np.zeros((self.config.max_slots,), np.int32)
    checked = []  # (request, most proposals) of the requests that propose under a grammar
    for r in ready:
      if self._checks_proposals(r):
        # Proposals start at the next draw and no token follows them in this step.
        want = min(k, r.params.max_tokens - len(r.tokens), self.max_seq_len - r.prefilled)
        extra = paging.pages_for(r.prefilled + want, P) - len(r.pages)
        if extra > 0:
          r.pages += self.scheduler.allocate_free(extra)
        checked.append((r, max(0, min(want, len(r.pages) * P - r.prefilled))))
        continue
      plain = not (r.params.uses_penalties or r.params.logit_bias or r.constraint is not None
                   or self._below_min_tokens(r))
      want = 0 if not plain else min(
          k, r.params.max_tokens - len(r.tokens) - 1, self.max_seq_len - r.prefilled - 1)
      extra = paging.pages_for(r.prefilled + 1 + max(want, 0), P) - len(r.pages)
      if extra > 0:
        r.pages += self.scheduler.allocate_free(extra)
      drafts[r.slot] = max(0, min(want, len(r.pages) * P - r.prefilled - 1))
    proposals = self._grammar_proposals([(r, n) for r, n in checked if n]) if checked else {}
    given = None
    if checked:  # with or without proposals this step: one program per width, not two
      B = self.config.max_slots
      given = (np.zeros(B, bool), np.zeros((B, k + 1), np.int32),
               np.full((B, k + 1, self._token_mask.shape[1]), -1, np.int32))
      for slot, (tokens, masks, _) in proposals.items():
        given[0][slot], given[1][slot, :len(tokens)], given[2][slot] = True, tokens, masks
        drafts[slot] = len(tokens)
    width = self.scheduler.table_width(ready)
    hist = None
    if self.runner.draft is None:  # prompt lookup searches each slot's history on the device
      hist = np.zeros((self.config.max_slots, width * P), np.int32)
      for r in ready:
        seq = r.sequence
        hist[r.slot, :len(seq)] = seq
    batch = self.runner.batch(*self.scheduler.batch_arrays(ready, width),
                              self._slot_adapters(), mask)
    with self._timed("wait"):  # the step runs in lockstep: dispatched and read back at once
      tokens, logp, n_acc, emitted, next_tokens = self.runner.speculative(batch, hist, drafts,
                                                                           given)
    self.stats["decode_steps"] += 1
    now = time.monotonic()
    for r in ready:
      slot, accepted = r.slot, int(n_acc[r.slot])
      self.stats["speculative_proposed"] += int(drafts[slot])
      self.stats["speculative_accepted"] += accepted
      r.known_next = None
      if slot in proposals:
        self.stats["grammar_proposed"] += int(drafts[slot])
        self.stats["grammar_accepted"] += accepted
        if accepted < drafts[slot] or proposals[slot][2]:  # drawn under the grammar's mask
          r.known_next = int(next_tokens[slot])
      r.prefilled += int(emitted[slot])  # the tokens it emits stay in the cache
      for j in range(int(emitted[slot])):
        if not self._emit(r, int(tokens[slot, j]), float(logp[slot, j]), now):
          break


def generate_all(engine: Engine, prompts: Sequence[Sequence[int]],
                 params: Sequence[sampling.SamplingParams]) -> list[Request]:
  """Submits every prompt and runs the engine in this thread until all are done."""
  requests = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
  engine.run_until_idle()
  return requests
