"""Supervised fine-tuning data: JSONL examples -> token ids with a loss mask -> packed rows.

A line of the JSONL file is one example, in one of two shapes:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (OpenAI / HF
      chat format): rendered with the model's own chat template; the loss falls on the
      assistant turns (each up to and including the template's end-of-turn marker) unless
      `loss_on="all"`.
  {"prompt": "...", "completion": "..."}: plain text, `[bos] + prompt` then `completion +
      [eos]`; the loss falls on the completion.

Each assistant turn is located by rendering the conversation up to it with the generation
prompt (what the model sees when asked to answer) and through it; the chunks between are
tokenized one by one, so the prompt tokens are exactly those a chat request at serving time
produces. Examples are packed whole into rows of `seq_len + 1` tokens (best fit, longest
first), positions restarting per example and attention kept inside it by segment ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from jaxllm.data import chat as chat_lib
from jaxllm.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("assistant", "all")
Batch = dict[str, np.ndarray]


class SftDataError(UserError, ValueError):
  """A fine-tuning file or example that cannot be used; the message names its line."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example: `ids` int32 `[n]`, `mask` float32 `[n]` (1 where the token is
  trained as a target); `line` is its 1-based line in the JSONL file."""
  ids: np.ndarray
  mask: np.ndarray
  line: int
  record: dict = dataclasses.field(compare=False, repr=False)


def read_jsonl(path: str | os.PathLike[str], check=None) -> list[tuple[int, dict]]:
  """(line number, record) of every non-blank line; SftDataError for bad JSON or for a record
  `check(record, "path:line")` refuses (default `check_record`: an SFT example)."""
  check = check or check_record
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise SftDataError(f"{path}: no such file (a JSONL file of chat or prompt/completion "
                       "examples)")
  out = []
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise SftDataError(f"{path}:{n}: not JSON ({e.msg})") from None
        check(record, f"{path}:{n}")
        out.append((n, record))
    except UnicodeDecodeError as e:
      raise SftDataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
  if not out:
    raise SftDataError(f"{path}: no examples")
  return out


def check_record(record: Any, where: str) -> None:
  """SftDataError unless `record` is a messages or prompt/completion example."""
  if not isinstance(record, dict):
    raise SftDataError(f"{where}: an example is a JSON object, got {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise SftDataError(f"{where}: messages must be a non-empty list")
    for i, m in enumerate(messages):
      if (not isinstance(m, dict) or m.get("role") not in ROLES
          or not isinstance(m.get("content"), str)):
        raise SftDataError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, "
                           "\"content\": string}")
    if not any(m["role"] == "assistant" for m in messages):
      raise SftDataError(f"{where}: no assistant turn to learn from")
  elif "prompt" in record or "completion" in record:
    for key in ("prompt", "completion"):
      if not isinstance(record.get(key), str):
        raise SftDataError(f"{where}: {key} must be a string")
    if not record["completion"]:
      raise SftDataError(f"{where}: empty completion: nothing to learn from")
  else:
    raise SftDataError(f"{where}: an example has \"messages\" or \"prompt\" and "
                       "\"completion\"")


def chat_chunks(messages: list[dict], template: str, tokenizer) -> list[tuple[str, bool]]:
  """The rendered conversation cut into (text, is an assistant turn) chunks, in order.

  Assistant turn i spans from the end of `render(messages[:i], generation prompt)` to the end
  of `render(messages[:i + 1])`; both must be prefixes of the whole rendering (true of the
  usual templates), else the turn cannot be located and SftDataError says so."""
  full = chat_lib.render(template, messages, tokenizer, add_generation_prompt=False)
  chunks, at = [], 0
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt = (chat_lib.render(template, messages[:i], tokenizer, add_generation_prompt=True)
              if i else "")
    through = chat_lib.render(template, messages[:i + 1], tokenizer,
                              add_generation_prompt=False)
    start = len(prompt)
    if not (full.startswith(prompt) and full.startswith(through) and at <= start
            <= len(through)):
      raise SftDataError("the chat template does not render a conversation's turns as "
                         "prefixes of it, so its assistant tokens cannot be located")
    if start > at:
      chunks.append((full[at:start], False))
    chunks.append((full[start:len(through)], True))
    at = len(through)
  if at < len(full):
    chunks.append((full[at:], False))
  return chunks


def tokenize(record: dict, tokenizer, loss_on: str = "assistant", line: int = 0) -> Example:
  """One example's ids and loss mask (see the module docstring)."""
  if loss_on not in LOSS_ON:
    raise SftDataError(f"loss_on={loss_on!r} must be one of {LOSS_ON}")
  ids: list[int] = []
  mask: list[float] = []

  def add(tokens, learn):
    ids.extend(tokens)
    mask.extend([1.0 if (learn or loss_on == "all") else 0.0] * len(tokens))

  if "messages" in record:
    template = tokenizer.chat_template
    if not template:
      raise SftDataError(f"line {line}: a messages example needs the model's chat template, "
                         "and this model has none (use prompt/completion examples)")
    try:
      chunks = chat_chunks(record["messages"], template, tokenizer)
    except ValueError as e:  # the template raised, or its turns are not prefixes
      raise SftDataError(f"line {line}: {e}") from None
    for text, learn in chunks:
      add(tokenizer.encode(text), learn)
  else:
    bos = ([tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None
           and tokenizer.bos_id >= 0 else [])
    add(bos + tokenizer.encode(record["prompt"]), False)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    add(tokenizer.encode(record["completion"]) + eos, True)
  if not any(mask[1:]):  # the first token is never a target
    raise SftDataError(f"line {line}: no token to learn from after tokenizing")
  return Example(np.asarray(ids, np.int32), np.asarray(mask, np.float32), line, record)


def split_examples(records: list[tuple[int, dict]], eval_fraction: float, seed: int
                   ) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
  """(train, held-out): a seeded random `eval_fraction` of the records held out (at least one
  each way when there are two or more)."""
  if not 0.0 <= eval_fraction < 1.0:
    raise SftDataError(f"eval_fraction={eval_fraction} must be in [0, 1)")
  order = np.random.default_rng(seed).permutation(len(records))
  n_eval = int(round(eval_fraction * len(records)))
  if eval_fraction > 0 and len(records) >= 2:
    n_eval = min(max(n_eval, 1), len(records) - 1)
  held = set(order[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def pack(examples: list[Example], seq_len: int) -> tuple[list[Batch], int]:
  """(rows, examples cut): every example placed whole in the row of `seq_len + 1` tokens it
  fits tightest (longest first; one longer than a row is cut to it). A row is
  {"tokens", "mask", "segment_ids" (1.. per example, 0 padding), "positions"}, each
  `[seq_len + 1]`."""
  width = seq_len + 1
  order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
  rows: list[list[int]] = []
  free: list[int] = []
  cut = 0
  for i in order:
    n = min(len(examples[i].ids), width)
    cut += len(examples[i].ids) > width
    fits = [r for r in range(len(rows)) if free[r] >= n]
    if fits:
      r = min(fits, key=lambda r: free[r])
    else:
      rows.append([])
      free.append(width)
      r = len(rows) - 1
    rows[r].append(i)
    free[r] -= n
  out = []
  for members in rows:
    row = {"tokens": np.zeros(width, np.int32), "mask": np.zeros(width, np.float32),
           "segment_ids": np.zeros(width, np.int32), "positions": np.zeros(width, np.int32)}
    at = 0
    for seg, i in enumerate(members, 1):
      ex = examples[i]
      n = min(len(ex.ids), width)
      row["tokens"][at:at + n] = ex.ids[:n]
      row["mask"][at:at + n] = ex.mask[:n]
      row["segment_ids"][at:at + n] = seg
      row["positions"][at:at + n] = np.arange(n)
      at += n
    out.append(row)
  return out, cut


def to_batch(rows: list[Batch]) -> Batch:
  """The train step's batch (`jaxllm.data.pipeline`'s keys, `[B, seq_len]` each): token t
  predicts token t + 1 with weight 1 where that target is learned and in the same example."""
  tokens = np.stack([r["tokens"] for r in rows])
  mask = np.stack([r["mask"] for r in rows])
  seg = np.stack([r["segment_ids"] for r in rows])
  pos = np.stack([r["positions"] for r in rows])
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": (mask[:, 1:] * same).astype(np.float32),
          "segment_ids": seg[:, :-1], "positions": pos[:, :-1]}


def batch_at(items: list, step: int, batch_size: int, seed: int, make=to_batch) -> Batch:
  """The batch of train step `step` (0-based): epochs of the items (packed rows, or any unit
  `make` turns into a batch), each epoch in its own seeded order, read `batch_size` at a time;
  a pure function of its arguments, so a resumed run reads on exactly where it stopped."""
  n = len(items)
  picked = []
  for k in range(step * batch_size, (step + 1) * batch_size):
    epoch, index = divmod(k, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    picked.append(items[order[index]])
  return make(picked)


def batches(items: list, batch_size: int, seed: int, start: int = 0,
            make=to_batch) -> Iterator[Batch]:
  """`batch_at(items, step, ...)` for step = start, start + 1, ..."""
  step = start
  while True:
    yield batch_at(items, step, batch_size, seed, make)
    step += 1


def eval_batches(items: list, batch_size: int, make=to_batch) -> list[Batch]:
  """Every held-out item once, in batches of `batch_size` (the last padded with all-zero
  items, whose weights are 0)."""
  out = []
  empty = zeros_like(items[0]) if items else None
  for i in range(0, len(items), batch_size):
    part = items[i:i + batch_size]
    out.append(make(part + [empty] * (batch_size - len(part))))
  return out


def zeros_like(item):
  """An item of the same structure (dicts, lists, arrays) with every array zero."""
  if isinstance(item, dict):
    return {k: zeros_like(v) for k, v in item.items()}
  if isinstance(item, (list, tuple)):
    return type(item)(zeros_like(v) for v in item)
  return np.zeros_like(item)
