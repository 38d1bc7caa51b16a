"""KV-cached generation: chunked prefill, then one jitted `lax.while_loop` decode per call.

The hot functions are pure and jitted over `(graphdef, params, ..., cache)` with the cache
donated, so it is updated in place:
  `extend_chunk`   T tokens per sequence (T from a few power-of-two buckets) -> last logits;
  `decode_step`    one token per sequence, all sequences at once (per-sequence lengths);
Then `device_loops.decode_loop` draws and feeds the serving engine's decode step
(`steps.draw_and_feed`) in a `lax.while_loop` that exits when all stop. Prompts are processed
in chunks of `prefill_chunk` tokens, the cache length and output buffer are rounded up to
powers of two, so a handful of compiled shapes serve all prompt lengths
(`traces.trace_counts` tells how many were built).

Both cache layouts work everywhere: `cache="contiguous"` (`[L, B, S, K, Dh]`) or `"paged"`
(a page pool and a page table filled by `PageAllocator`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.inference import device_loops, paging, sampling
from jaxllm.inference.traces import count_trace
from jaxllm.model import cache as kv_cache
from jaxllm.parallel import placement

CACHE_KINDS = ("contiguous", "paged")
# Why a request ended: a stop token or string, max_tokens, or (engine) cancelled by its client.
# error: the engine failed; grammar_dead_end: a request's grammar allowed no next token
FinishReason = Literal["stop", "length", "cancelled", "error", "grammar_dead_end"]
# The decode loops' reason codes (0: still running).
FINISH_REASONS: dict[int, FinishReason] = {1: "stop", 2: "length"}

@dataclasses.dataclass
class Generation:
  """One request's output: tokens (stop token excluded), their logprobs, why it ended."""
  tokens: list[int]
  logprobs: list[float]
  finish_reason: FinishReason
  text: str | None = None  # filled in by callers with a tokenizer


# Called on the host while a decode loop runs, after every step: (tokens `[B, N]` int32, counts
# `[B]` int32), row b's output so far being tokens[b, :counts[b]] (the stop token excluded). A
# hashable function (it is a static argument of the jitted loop: a new one compiles anew); it
# must not raise. How the command line streams its text (`jaxllm.inference.text_stream`).
OnTokens = Callable[[np.ndarray, np.ndarray], None]


def check_on_tokens(on_tokens: OnTokens | None, mesh) -> None:
  if on_tokens is not None and mesh is not None and mesh.size > 1:
    raise ValueError("streamed output (on_tokens) runs on one device, not a mesh of "
                     f"{mesh.size}")


def bucket(n: int, minimum: int = 16) -> int:
  """n rounded up to a power of two (at least `minimum`)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def new_cache(cfg, kind: str, lengths_needed: Sequence[int], *, max_len: int,
              page_size: int = 16, dtype=jnp.float32, mesh=None, longest_step: int | None = None):
  """An empty cache for len(lengths_needed) sequences of up to `max_len` tokens, created in its
  shards on `mesh` when given (split over KV heads, `placement.cache_sharding`).

  Contiguous, for a sliding-window model: a ring buffer of only the slots the window needs when
  steps add up to `longest_step` tokens (`kv_cache.ring_len`, rounded up to a power of two), when
  that is shorter than `max_len`.

  Paged: sequence b gets pages for lengths_needed[b] tokens from a `PageAllocator`, allocated a
  page at a time round-robin so no sequence's pages are adjacent (the table is exercised).
  """
  B = len(lengths_needed)
  if kind == "contiguous":
    if cfg.cache_window and longest_step is not None:
      max_len = min(max_len, bucket(kv_cache.ring_len(cfg.cache_window, longest_step)))
    shape = (cfg.n_layers, B, max_len, cfg.n_kv_heads, cfg.head_dim)
    return kv_cache.KVCache(placement.zeros_on(mesh, shape, dtype, paged=False),
                            placement.zeros_on(mesh, shape, dtype, paged=False),
                            jnp.zeros((B,), jnp.int32))
  if kind != "paged":
    raise ValueError(f"cache={kind!r}: one of {', '.join(CACHE_KINDS)}")
  max_pages = paging.pages_for(max_len, page_size)
  allocator = paging.PageAllocator(B * max_pages)
  want = [paging.pages_for(n, page_size) for n in lengths_needed]
  pages: list[list[int]] = [[] for _ in range(B)]
  for i in range(max(want, default=0)):
    for b in range(B):
      if i < want[b]:
        pages[b] += allocator.allocate(1)
  table = paging.page_table_array(pages, max_pages)
  shape = (cfg.n_layers, B * max_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
  return kv_cache.PagedKVCache(placement.zeros_on(mesh, shape, dtype, paged=True),
                               placement.zeros_on(mesh, shape, dtype, paged=True),
                               jnp.asarray(table), jnp.zeros((B,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "stream"),
                   donate_argnames=("cache", "last_BV"))
def extend_chunk(graphdef, params, tokens_BT, cache, num_new_B, last_BV, stream=None):
  """Extends the cache by one prompt chunk; `last_BV` takes the logits after each sequence's
  last real token where this chunk has any (others keep theirs)."""
  count_trace("extend_chunk")
  logits_B1V, cache = nnx.merge(graphdef, params).extend(tokens_BT, cache, num_new_B,
                                                         last_only=True, stream=stream)
  return jnp.where((num_new_B > 0)[:, None], logits_B1V[:, 0], last_BV), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "stream"), donate_argnames=("cache",))
def decode_step(graphdef, params, tokens_B, cache, active_B=None, stream=None):
  """One new token per sequence -> (logits `[B, V]`, cache); inactive rows store nothing."""
  count_trace("decode_step")
  num_new_B = None if active_B is None else active_B.astype(jnp.int32)
  logits_B1V, cache = nnx.merge(graphdef, params).extend(tokens_B[:, None], cache, num_new_B,
                                                         stream=stream)
  return logits_B1V[:, 0], cache


def pad_prompts(prompts: Sequence[Sequence[int]], chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """`[B, P]` right-padded tokens with P a multiple of the chunk, and `[B]` lengths."""
  longest = max(len(p) for p in prompts)
  P = -(-longest // chunk) * chunk
  tokens = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def chunk_size(longest: int, prefill_chunk: int) -> int:
  return min(bucket(prefill_chunk, minimum=1), bucket(longest))


def prefill(graphdef, params, prompts: Sequence[Sequence[int]], cache, *,
            prefill_chunk: int = 256, vocab_size: int, stream: kv_cache.Stream | None = None):
  """Runs the prompts into an empty cache chunk by chunk -> (logits `[B, V]` after each
  prompt's last token, cache)."""
  chunk = chunk_size(max(len(p) for p in prompts), prefill_chunk)
  tokens, lengths = pad_prompts(prompts, chunk)
  last = jnp.zeros((len(prompts), vocab_size), jnp.float32)
  for start in range(0, tokens.shape[1], chunk):
    num_new = np.clip(lengths - start, 0, chunk).astype(np.int32)
    last, cache = extend_chunk(graphdef, params, jnp.asarray(tokens[:, start:start + chunk]),
                                cache, jnp.asarray(num_new), last, stream=stream)
  return last, cache


def stop_id_array(params: Sequence[sampling.SamplingParams], eos_id: int) -> np.ndarray:
  """`[B, X]` int32 stop tokens per request (eos included), padded with -1; X a power of two."""
  ids = [sorted(set(p.stop_token_ids) | ({eos_id} if eos_id >= 0 and not p.ignore_eos
                                           else set())) for p in params]
  width = bucket(max((len(x) for x in ids), default=1), minimum=1)
  out = np.full((len(params), width), -1, np.int32)
  for b, x in enumerate(ids):
    out[b, :len(x)] = x
  return out


def prompt_mask(prompts: Sequence[Sequence[int]], vocab_size: int) -> jax.Array:
  mask = np.zeros((len(prompts), vocab_size), bool)
  for b, p in enumerate(prompts):
    mask[b, np.asarray(p, np.int64)] = True
  return jnp.asarray(mask)


def check_prompts(prompts: Sequence[Sequence[int]], params: Sequence[sampling.SamplingParams],
                  vocab_size: int, max_seq_len: int | None) -> None:
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if len(params) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
  for b, (p, sp) in enumerate(zip(prompts, params)):
    if min(p) < 0 or max(p) >= vocab_size:
      raise ValueError(f"prompt {b} has token ids outside [0, {vocab_size})")
    if max_seq_len is not None and len(p) + sp.max_tokens > max_seq_len:
      raise ValueError(f"prompt ({len(p)} tokens) + max_tokens ({sp.max_tokens}) exceeds the "
                       f"model's max_seq_len {max_seq_len}")


def generate_requests(graphdef, params, prompts: Sequence[Sequence[int]],
                      sampling_params: Sequence[sampling.SamplingParams], *, eos_id: int = -1,
                      max_seq_len: int | None = None, cache: str = "contiguous",
                      page_size: int = 16, prefill_chunk: int = 256,
                      cache_dtype=jnp.float32, stream: kv_cache.Stream | None = None,
                      on_tokens: OnTokens | None = None) -> list[Generation]:
  """Continues each prompt under its own SamplingParams (stop strings are the caller's).

  Params placed on a mesh (`placement.place_params`) run there, the cache split like them.
  `stream` (contiguous cache only): StreamingLLM generation in constant memory, a cache of the
  first `stream.sinks` tokens and the `stream.window` latest; prompts and outputs may then run
  past max_seq_len (positions stay within sinks + window + the prefill chunk).
  `on_tokens`: see `OnTokens`."""
  if any(sp.logit_bias or sp.min_tokens for sp in sampling_params):
    raise ValueError("logit_bias and min_tokens are applied by the serving engine "
                     "(jaxllm.inference.engine), not by this decode loop")
  mesh = placement.mesh_of(params)
  check_on_tokens(on_tokens, mesh)
  with placement.in_mesh(mesh):
    return _generate_requests(graphdef, params, prompts, sampling_params, eos_id=eos_id,
                              max_seq_len=max_seq_len, cache=cache, page_size=page_size,
                              prefill_chunk=prefill_chunk, cache_dtype=cache_dtype, mesh=mesh,
                              stream=stream, on_tokens=on_tokens)


def stream_of(sink_tokens: int, stream_window: int) -> kv_cache.Stream | None:
  """The StreamingLLM setting of `--sink_tokens` / `--stream_window` (None: off, window 0)."""
  if sink_tokens < 0 or stream_window < 0:
    raise ValueError(f"sink_tokens={sink_tokens} and stream_window={stream_window} must be "
                     ">= 0")
  if sink_tokens and not stream_window:
    raise ValueError("sink_tokens needs a stream_window (the recent tokens kept beside them)")
  return kv_cache.Stream(sink_tokens, stream_window) if stream_window else None


def check_stream(stream: kv_cache.Stream, max_seq_len: int | None, cfg=None) -> None:
  """Refuses a streaming setup that cannot run (for the model `cfg`, when given), in one line."""
  if cfg is not None and (cfg.global_every or cfg.attn_logit_soft_cap):
    raise ValueError("streaming generation (sink_tokens / stream_window) does not support "
                     "models with local and global layers or soft-capped attention yet")
  if stream.window < 1 or stream.sinks < 0:
    raise ValueError(f"stream_window={stream.window} must be >= 1 and sink_tokens="
                     f"{stream.sinks} >= 0")
  if max_seq_len is not None and stream.sinks + stream.window > max_seq_len:
    raise ValueError(f"sink_tokens + stream_window = {stream.sinks + stream.window} exceeds the "
                     f"model's max_seq_len {max_seq_len}: the cache positions would leave the "
                     "context it was trained on")


def _generate_requests(graphdef, params, prompts, sampling_params, *, eos_id, max_seq_len,
                       cache, page_size, prefill_chunk, cache_dtype, mesh, stream, on_tokens):
  cfg = model_config(graphdef, params)
  if stream is not None:
    check_stream(stream, max_seq_len, cfg)
    if cache != "contiguous":  # the engine streams through pages (`EngineConfig.stream_window`)
      raise ValueError("streaming generation (sink_tokens / stream_window) needs the "
                       "contiguous cache")
  check_prompts(prompts, sampling_params, cfg.vocab_size,
                None if stream is not None else max_seq_len)
  chunk = chunk_size(max(len(p) for p in prompts), prefill_chunk)
  padded = -(-max(len(p) for p in prompts) // chunk) * chunk
  max_new = max(sp.max_tokens for sp in sampling_params)
  S = bucket(padded + max_new) if stream is None else stream.cache_len(chunk)
  needed = [len(p) + sp.max_tokens for p, sp in zip(prompts, sampling_params)]
  kv = new_cache(cfg, cache, needed, max_len=S, page_size=page_size, dtype=cache_dtype,
                 mesh=mesh, longest_step=None if stream is not None else chunk)
  last, kv = prefill(graphdef, params, prompts, kv, prefill_chunk=prefill_chunk,
                     vocab_size=cfg.vocab_size, stream=stream)
  penalties = any(sp.uses_penalties for sp in sampling_params)
  mask = prompt_mask(prompts, cfg.vocab_size) if penalties else jnp.zeros((1, 1), bool)
  out, logp, n, reason = device_loops.decode_loop(
      graphdef, params, kv, last, sampling.SamplingArrays.of(sampling_params),
      jnp.asarray([sp.max_tokens for sp in sampling_params], jnp.int32),
      jnp.asarray(stop_id_array(sampling_params, eos_id)), mask, out_len=bucket(max_new),
      penalties=penalties, stream=stream, on_tokens=on_tokens)
  out, logp, n, reason = jax.device_get((out, logp, n, reason))
  return [Generation(out[b, :n[b]].tolist(), logp[b, :n[b]].tolist(),
                     FINISH_REASONS.get(int(reason[b]), "length")) for b in range(len(prompts))]


def model_config(graphdef, params):
  """The ModelConfig a Transformer (graphdef, params) pair was built with."""
  return nnx.merge(graphdef, params).cfg


def generate(graphdef, params, prompts: Sequence[Sequence[int]], *, max_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int = -1, max_seq_len: int | None = None, cache: str = "contiguous",
             cache_dtype=jnp.float32) -> list[list[int]]:
  """Continues each prompt by up to `max_tokens` tokens (stopping at `eos_id`, not included).

  Every row samples with the same settings and seed (identical prompts, identical outputs).
  """
  if max_tokens <= 0:
    raise ValueError(f"max_tokens={max_tokens} must be positive")
  sp = sampling.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               max_tokens=max_tokens)
  results = generate_requests(graphdef, params, prompts, [sp] * len(prompts), eos_id=eos_id,
                              max_seq_len=max_seq_len, cache=cache, cache_dtype=cache_dtype)
  return [r.tokens for r in results]
