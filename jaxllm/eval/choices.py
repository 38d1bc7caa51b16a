"""Multiple-choice accuracy by loglikelihood: each item's answer is the choice the model finds
most likely after its context.

Items are JSONL records `{"context": str, "choices": [str, ...], "gold": int}`. The model scores
each choice as a continuation of the context, tokenized the way lm-evaluation-harness
tokenizes a (context, continuation) pair for a causal model over an OpenAI-compatible server:
no BOS, whitespace that ends the context moved to the start of the continuation, and the
continuation's tokens being those of the joined text after the context's own tokens (so a
merge across the boundary is scored as the harness scores it). `acc` picks the highest
loglikelihood, `acc_norm` the highest per character of the choice. `examples/lm_eval/` holds
the same items as an lm-eval task, so the harness against `python -m jaxllm.serve` reports the
numbers this module computes (tests/test_lm_eval.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.data import sft as sft_data
from jaxllm.inference import logprobs as logprobs_lib


def read_items(path: str) -> list[dict]:
  """The items of a JSONL file (`jaxllm.data.sft.read_jsonl`); a ValueError naming the line of
  a malformed one."""
  return [item for _, item in sft_data.read_jsonl(path, _check_item)]


def _check_item(item, where: str) -> None:
  """Refuses (naming `where`, "path:line") a record that is not a multiple-choice item."""
  if not _well_formed(item):
    raise sft_data.SftDataError(
        f"{where}: an item is {{\"context\": non-empty text, \"choices\": two or more "
        "non-empty texts, \"gold\": the right choice's index}")


def _well_formed(item) -> bool:
  if not isinstance(item, dict):
    return False
  context, choices, gold = item.get("context"), item.get("choices"), item.get("gold")
  return (isinstance(context, str) and bool(context) and isinstance(choices, list)
          and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
          and isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as the module docstring describes."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  context_ids = tokenizer.encode(stripped)
  whole = tokenizer.encode(stripped + continuation)
  return context_ids, whole[len(context_ids):]


def loglikelihoods(model, pairs: list[tuple[str, str]], *, batch_size: int = 8
                   ) -> list[tuple[float, bool]]:
  """(log p(continuation | context), whether every continuation token is the model's argmax)
  for each (context, continuation) of `pairs`; `model` is a `jaxllm.LoadedModel`."""
  encoded = [encode_pair(model.tokenizer, c, x) for c, x in pairs]
  for (c, x), (ctx, cont) in zip(pairs, encoded):
    if not ctx or not cont:
      raise ValueError(f"nothing to score: context {c!r} with continuation {x!r} tokenizes to "
                       f"{len(ctx)} and {len(cont)} tokens")
  scored = logprobs_lib.score(model.graphdef, model.params, [c + x for c, x in encoded],
                              max_len=model.config.max_seq_len, top_k=1, batch_size=batch_size)
  out = []
  for (ctx, cont), s in zip(encoded, scored):
    # Position t - 1 of the scores is token t's: the continuation's run from len(ctx) - 1.
    span = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(s.token_logprobs[j] for j in span)
    greedy = all(s.top[j][0][0] == tok for j, tok in zip(span, cont))
    out.append((total, greedy))
  return out


def score(model, items: list[dict], *, batch_size: int = 8) -> dict[str, Any]:
  """{"acc", "acc_norm", "n", "loglikelihoods": per item, per choice} over `items`."""
  pairs = [(it["context"], c) for it in items for c in it["choices"]]
  lls = [ll for ll, _ in loglikelihoods(model, pairs, batch_size=batch_size)]
  per_item, acc, acc_norm, at = [], 0, 0, 0
  for it in items:
    ll = np.array(lls[at:at + len(it["choices"])])
    at += len(it["choices"])
    chars = np.array([len(c) for c in it["choices"]], np.float64)
    acc += int(np.argmax(ll)) == it["gold"]
    acc_norm += int(np.argmax(ll / chars)) == it["gold"]
    per_item.append([float(x) for x in ll])
  n = len(items)
  return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "loglikelihoods": per_item}
