"""Generation-based exact match on fine-tuning examples: the model answers each example's
prompt greedily, and the reply counts when it equals the reference (surrounding whitespace
ignored).

A messages example's prompt is its conversation before the last turn, which must be the
assistant's (the reference), rendered with the model's chat template and the generation
prompt; a prompt/completion example's is its prompt as raw text.
"""

from __future__ import annotations

from typing import Any


def prompt_and_reference(model, record: dict) -> tuple[list[int], str] | None:
  """(prompt ids, reference text), or None for a conversation not ending with the assistant."""
  if "messages" in record:
    messages = record["messages"]
    if messages[-1]["role"] != "assistant":
      return None
    return model.chat_ids(messages[:-1]), messages[-1]["content"]
  return model.prompt_ids(record["prompt"]), record["completion"]


def score(model, records: list[tuple[int, dict]], extra_tokens: int = 8) -> dict[str, Any]:
  """{"exact_match", "correct", "n", "replies": [(line, reply, reference), ...]} over the
  scorable `records` ((line, record) pairs); `model` is a `jaxllm.LoadedModel`. Each reply may
  run `extra_tokens` past its reference's length in tokens."""
  items = [(n, pr) for n, r in records if (pr := prompt_and_reference(model, r)) is not None]
  if not items:
    return {"exact_match": 0.0, "correct": 0, "n": 0, "replies": []}
  longest = max(len(model.tokenizer.encode(ref)) for _, (_, ref) in items)
  results = model.generate([ids for _, (ids, _) in items], max_tokens=longest + extra_tokens,
                           details=True)
  replies = [(n, model.tokenizer.decode(r.tokens), ref)
             for (n, (_, ref)), r in zip(items, results)]
  correct = sum(reply.strip() == ref.strip() for _, reply, ref in replies)
  return {"exact_match": correct / len(replies), "correct": correct, "n": len(replies),
          "replies": replies}
