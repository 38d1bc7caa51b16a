"""Log-probabilities of given token sequences: each token's under the model given the tokens
before it, and the most likely alternatives at each position.

One implementation for two callers: the server's prompt logprobs (`echo` with `logprobs` on
/v1/completions, and `top_logprobs`) and `jaxllm.eval --choices` (the loglikelihood of each
answer of a multiple-choice item), so the evaluation harness driving the server and our own
evaluator score with the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.lora import bank as lora_bank
from jaxllm.parallel import placement

MIN_BUCKET = 16  # sequences pad to a power of two from here: few compiled shapes


@dataclasses.dataclass(frozen=True)
class Scored:
  """One sequence's scores: `token_logprobs[t - 1]` = log p(ids[t] | ids[:t]) for t >= 1 (the
  first token has none), and `top[t - 1]` the `top_k` most likely (id, logprob) there, most
  likely first."""
  token_logprobs: list[float]
  top: list[list[tuple[int, float]]]


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def score_rows(graphdef, params, tokens_BT, adapters_B=None, *, top_k: int):
  """(logp_BT `[B, T - 1]` of tokens 1.. given those before, top ids and logprobs
  `[B, T - 1, top_k]`): one causal forward pass; padding after a row's end changes nothing
  before it."""
  model = nnx.merge(graphdef, lora_bank.select(params, adapters_B))
  logits_BTV = model(tokens_BT)[:, :-1].astype(jnp.float32)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  if top_k == 0:
    B, T = logp_BT.shape
    return logp_BT, jnp.zeros((B, T, 0), jnp.float32), jnp.zeros((B, T, 0), jnp.int32)
  top_logp, top_ids = jax.lax.top_k(logp_BTV, top_k)
  return logp_BT, top_logp, top_ids


def bucket(length: int, max_len: int) -> int:
  """The padded length of a sequence: the next power of two (at least MIN_BUCKET), at most
  `max_len`."""
  return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


def score(graphdef, params, sequences: Sequence[Sequence[int]], *, max_len: int,
          top_k: int = 0, adapter: int = 0, batch_size: int = 8) -> list[Scored]:
  """`Scored` for each of `sequences` (each 1 to `max_len` tokens, ValueError otherwise),
  `batch_size` rows per forward pass, sequences of one padded length together. `adapter`: the
  LoRA bank slot to score with where `params` hold banks (`jaxllm.lora.bank`)."""
  for s in sequences:
    if not 1 <= len(s) <= max_len:
      raise ValueError(f"a scored sequence has {len(s)} tokens; 1 to {max_len} can be scored")
  banked = lora_bank.size(params) > 1
  out: list[Scored | None] = [None] * len(sequences)
  by_width: dict[int, list[int]] = {}
  for i, s in enumerate(sequences):
    by_width.setdefault(bucket(len(s), max_len), []).append(i)
  with placement.in_mesh(placement.mesh_of(params)):
    for width, members in sorted(by_width.items()):
      for lo in range(0, len(members), batch_size):
        rows = members[lo:lo + batch_size]
        tokens = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
          tokens[r, :len(sequences[i])] = sequences[i]
        adapters = jnp.full((batch_size,), adapter, jnp.int32) if banked else None
        logp, top_logp, top_ids = jax.device_get(
            score_rows(graphdef, params, jnp.asarray(tokens), adapters, top_k=top_k))
        for r, i in enumerate(rows):
          n = len(sequences[i]) - 1
          out[i] = Scored(
              token_logprobs=[float(x) for x in logp[r, :n]],
              top=[[(int(t), float(lp)) for t, lp in zip(top_ids[r, j], top_logp[r, j])]
                   for j in range(n)])
  return out
