"""Preference pairs: JSONL rows of a prompt with a chosen and a rejected reply -> token rows
whose loss mask covers each reply alone.

A line is {"prompt": "...", "chosen": "...", "rejected": "..."} (plain text: `[bos] + prompt`,
then the reply + `[eos]`, as `jaxllm.data.sft`'s prompt/completion) or {"messages": [the
conversation before the reply], "chosen": "...", "rejected": "..."} (the model's chat
template; the reply is one more assistant turn, learned through its end-of-turn marker). Each
pair becomes two rows of `seq_len + 1` tokens, chosen then rejected, one sequence each (no
packing: the losses compare the two sequences' summed log-probabilities). A reward model reads
each whole sequence instead (`to_reward_batch`: rows of `seq_len` tokens, not shifted, and the
index of each one's last token).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.data import sft
from jaxllm.data.sft import Example, SftDataError


def check_pair(record: Any, where: str) -> None:
  """SftDataError unless `record` is a preference pair (see the module docstring)."""
  if not isinstance(record, dict):
    raise SftDataError(f"{where}: a pair is a JSON object, got {type(record).__name__}")
  for key in ("chosen", "rejected"):
    if not isinstance(record.get(key), str) or not record[key]:
      raise SftDataError(f"{where}: {key} must be a non-empty string")
  if record["chosen"].strip() == record["rejected"].strip():
    raise SftDataError(f"{where}: chosen and rejected are the same reply: nothing to prefer")
  if "messages" in record:
    if not isinstance(record["messages"], list) or not record["messages"]:
      raise SftDataError(f"{where}: messages must be a non-empty list (the conversation "
                         "before the reply)")
    sft.check_record({"messages": record["messages"] + [
        {"role": "assistant", "content": record["chosen"]}]}, where)
  elif not isinstance(record.get("prompt"), str):
    raise SftDataError(f"{where}: a pair has \"prompt\" (a string) or \"messages\" (the "
                       "conversation before the reply)")


def reply_example(record: dict, reply: str, tokenizer, line: int = 0) -> Example:
  """The record's prompt and `reply` as one example, rendered as training renders it (the
  chat template, or prompt + completion), the mask on the reply's tokens alone."""
  if "messages" not in record:
    return sft.tokenize({"prompt": record["prompt"], "completion": reply}, tokenizer, line=line)
  messages = record["messages"] + [{"role": "assistant", "content": reply}]
  template = tokenizer.chat_template
  if not template:
    raise SftDataError(f"line {line}: a messages pair needs the model's chat template, and this "
                       "model has none (use prompt pairs)")
  try:
    chunks = sft.chat_chunks(messages, template, tokenizer)
  except ValueError as e:
    raise SftDataError(f"line {line}: {e}") from None
  last = max(i for i, (_, learned) in enumerate(chunks) if learned)
  ids, mask = [], []
  for i, (text, _) in enumerate(chunks):
    part = tokenizer.encode(text)
    ids += part
    mask += [float(i == last)] * len(part)
  return Example(np.asarray(ids, np.int32), np.asarray(mask, np.float32), line, record)


def tokenize_pair(record: dict, tokenizer, line: int = 0) -> tuple[Example, Example]:
  """(chosen, rejected) examples, the mask on the reply's tokens alone."""
  return (reply_example(record, record["chosen"], tokenizer, line),
          reply_example(record, record["rejected"], tokenizer, line))


def rows(pairs: list[tuple[Example, Example]], seq_len: int) -> tuple[list[list[dict]], int]:
  """([chosen row, rejected row] per pair, replies cut): each sequence alone in a row of
  `seq_len + 1` tokens (`sft.pack`'s row layout), cut at the end if longer."""
  width, out, cut = seq_len + 1, [], 0
  for pair in pairs:
    both = []
    for ex in pair:
      n = min(len(ex.ids), width)
      cut += len(ex.ids) > width
      row = {"tokens": np.zeros(width, np.int32), "mask": np.zeros(width, np.float32),
             "segment_ids": np.zeros(width, np.int32), "positions": np.zeros(width, np.int32)}
      row["tokens"][:n], row["mask"][:n] = ex.ids[:n], ex.mask[:n]
      row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
      both.append(row)
    out.append(both)
  return out, cut


def to_batch(pairs: list[list[dict]]) -> sft.Batch:
  """`[B, 2, seq_len]` arrays (the train step's keys; [:, 0] chosen, [:, 1] rejected)."""
  flat = sft.to_batch([row for pair in pairs for row in pair])
  return {k: v.reshape(len(pairs), 2, *v.shape[1:]) for k, v in flat.items()}


def to_reward_batch(pairs: list[list[dict]]) -> dict[str, np.ndarray]:
  """A reward model's `[B, 2, W]` batch of `rows(pairs, seq_len - 1)`'s rows (W = seq_len):
  every token as an input (nothing is predicted), positions, segment ids, and `last` `[B, 2]`,
  each sequence's last token (where its score is read)."""
  def stack(key):
    return np.stack([[row[key] for row in pair] for pair in pairs])
  segments = stack("segment_ids")
  return {"inputs": stack("tokens"), "positions": stack("positions"),
          "segment_ids": segments, "last": (segments > 0).sum(-1).astype(np.int32) - 1}
