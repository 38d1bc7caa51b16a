"""The prompts an RL run samples from: JSONL records (`{"prompt": text}` or `{"messages":
[...]}` ending on a user turn, with whatever their rewards read) as token ids."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxllm.data.sft import SftDataError


@dataclasses.dataclass
class Prompts:
  """Token prompts with the records their rewards read."""
  records: list[dict]
  ids: list[list[int]]


def check_record(record, where: str) -> None:
  """SftDataError (naming `where`) unless `record` is {"prompt": text} or {"messages": [...]}
  ending on a user (or system) turn."""
  if not isinstance(record, dict):
    raise SftDataError(f"{where}: a record must be a JSON object")
  if isinstance(record.get("prompt"), str):
    return
  messages = record.get("messages")
  if (not isinstance(messages, list) or not messages
      or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
    raise SftDataError(f"{where}: a record needs \"prompt\" (text) or \"messages\" (a list of "
                       "{\"role\", \"content\"})")
  if messages[-1].get("role") == "assistant":
    raise SftDataError(f"{where}: \"messages\" ends on an assistant turn; the policy writes "
                       "that one")


def prompt_ids(record: dict, model) -> list[int]:
  """A record's prompt for a `jaxllm.load`ed model: its messages through the chat template
  (the assistant's turn opened), or its raw prompt text."""
  if "messages" in record:
    return model.chat_ids(record["messages"])
  return model.prompt_ids(record["prompt"])


def fitting(records: Sequence[dict], model, limit: int) -> tuple[Prompts, int]:
  """(the records whose prompt has at most `limit` tokens, as Prompts; how many were
  longer)."""
  kept = [(r, prompt_ids(r, model)) for r in records]
  fit = [(r, ids) for r, ids in kept if len(ids) <= limit]
  return Prompts([r for r, _ in fit], [ids for _, ids in fit]), len(kept) - len(fit)
