"""Rollouts: completions sampled from the policy's current weights, in this process.

`Sampler` keeps one continuous-batching engine (`jaxllm.inference.engine`: paged KV cache,
prefix cache) for the whole run and hands it the policy's params before each rollout
(`Engine.set_params`: the arrays the trainer holds, not a copy and never a checkpoint), so the
group of completions of one prompt shares that prompt's cached pages and the engine always
samples from the weights of the last update. `rl.rollout=generate` samples through plain
batched `generate_requests` instead (the peer of the rollout-throughput comparison).

`rows` turns completions into the `[N, T]` rows the losses read (`jaxllm.rl.losses`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from jaxllm.inference import engine as engine_lib
from jaxllm.inference import generate as generate_lib
from jaxllm.inference import paging, sampling

PAGE_SIZE = 16
PREFILL_CHUNK, PREFILL_ROWS = 64, 8


@dataclasses.dataclass
class Completion:
  """One sampled reply: `tokens` (the stop token excluded), the sampler's log-probability of
  each (the model's own distribution, at temperature 1), and whether it stopped (EOS) rather
  than running out of `max_new_tokens`."""
  prompt: list[int]
  tokens: list[int]
  logprobs: list[float]
  stopped: bool


def sample_seed(seed: int, step: int, index: int) -> int:
  """The sampling seed of completion `index` of rollout `step`: a pure function, so a resumed
  run samples what the interrupted one would have."""
  return int(np.random.default_rng([seed, step, index]).integers(0, 2 ** 31 - 1))


class Sampler:
  """Samples completions of token prompts from given params, by `mode` engine or generate."""

  def __init__(self, graphdef, params, *, eos_id: int, max_seq_len: int, max_slots: int = 16,
               mode: str = "engine"):
    self.graphdef, self.eos_id, self.max_seq_len, self.mode = (graphdef, eos_id, max_seq_len,
                                                               mode)
    self.engine = None
    if mode == "engine":
      pages = paging.pages_for(max_seq_len, PAGE_SIZE)
      # Every slot's longest sequence, and as much again for cached prompt pages. A rollout
      # submits its prompts at once: up to 8 of them prefill per step.
      config = engine_lib.EngineConfig(max_slots=max_slots, num_pages=2 * max_slots * pages,
                                       page_size=PAGE_SIZE, prefill_chunk=PREFILL_CHUNK,
                                       prefill_rows=min(max_slots, PREFILL_ROWS),
                                       max_seq_len=max_seq_len)
      self.engine = engine_lib.Engine(graphdef, params, config, eos_id=eos_id)

  def sample(self, params, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *,
             max_tokens: int, temperature: float = 1.0, top_p: float = 1.0
             ) -> tuple[list[Completion], dict]:
    """A completion of each prompt (prompts repeat for a group) with its own seed, and
    {"tokens": sampled, "seconds": wall time, "prefix_pages": prompt pages reused}."""
    sps = [sampling.SamplingParams(temperature=temperature, top_p=top_p, seed=int(s),
                                   max_tokens=max_tokens) for s in seeds]
    began = time.perf_counter()
    reused = 0
    if self.engine is not None:
      self.engine.set_params(params)
      hits = self.engine.prefix_cache.hits
      requests = engine_lib.generate_all(self.engine, prompts, sps)
      reused = self.engine.prefix_cache.hits - hits
      outs = [(r.tokens, r.logprobs, r.finish_reason) for r in requests]
    else:
      gens = generate_lib.generate_requests(self.graphdef, params, prompts, sps,
                                            eos_id=self.eos_id, max_seq_len=self.max_seq_len,
                                            cache="paged", page_size=PAGE_SIZE)
      outs = [(g.tokens, g.logprobs, g.finish_reason) for g in gens]
    seconds = time.perf_counter() - began
    completions = [Completion(list(p), list(t), list(lp), why == "stop")
                   for p, (t, lp, why) in zip(prompts, outs)]
    return completions, {"tokens": sum(len(c.tokens) for c in completions),
                         "seconds": seconds, "prefix_pages": reused}


def rows(completions: Sequence[Completion], seq_len: int, eos_id: int,
         keep: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """The `[N, T]` (T = `seq_len`) rows of completions: inputs / targets of prompt +
  completion (+ EOS where it stopped: the model learns to end), `weights` 1 on completion
  targets, `sampled_logps` the sampler's log-probabilities there (0 on the EOS, which the
  sampler does not report; `sampled_mask` marks the others). Completions with `keep` False
  become padding rows (weight 0)."""
  N = len(completions)
  out = {k: np.zeros((N, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids")}
  out["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (N, seq_len)).copy()
  for k in ("weights", "sampled_logps", "sampled_mask"):
    out[k] = np.zeros((N, seq_len), np.float32)
  for i, c in enumerate(completions):
    if keep is not None and not keep[i]:
      continue
    reply = c.tokens + ([eos_id] if c.stopped and eos_id >= 0 else [])
    seq = (c.prompt + reply)[:seq_len + 1]
    n = len(seq) - 1
    out["inputs"][i, :n] = seq[:-1]
    out["targets"][i, :n] = seq[1:]
    out["segment_ids"][i, :n] = 1
    first = len(c.prompt) - 1  # the target index of the reply's first token
    out["weights"][i, first:n] = 1.0
    m = min(len(c.logprobs), n - first)
    out["sampled_logps"][i, first:first + m] = c.logprobs[:m]
    out["sampled_mask"][i, first:first + m] = 1.0
  return out
