"""Synthetic instructions with checkable answers, for fine-tuning experiments that need no
download: arithmetic, sorting, formatting and extraction, each a one-turn chat whose reply is
a short exact string (`python -m jaxllm.data instructions --out=FILE.jsonl`).

Each problem also has a plausible wrong answer (off by one, one pair swapped, the wrong case,
the wrong number): `pairs` are the chosen/rejected rows of a preference dataset from the same
generator.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

TASKS = ("add", "multiply", "sort", "upper", "reverse_words", "extract_year")
_WORDS = ("river", "lantern", "copper", "meadow", "falcon", "orbit", "harbor", "violet",
          "canyon", "ember", "glacier", "thistle", "quartz", "willow", "saddle", "marble")
_PLACES = ("the bridge", "the library", "the observatory", "the harbor wall", "the museum",
           "the railway", "the lighthouse", "the town hall")
_VERBS = ("opened", "was rebuilt", "was finished", "first closed", "was restored")


def _add(rng):
  a, b = (int(x) for x in rng.integers(10, 500, size=2))
  return (f"What is {a} + {b}? Reply with the number only.", str(a + b), str(a + b + 1))


def _multiply(rng):
  a, b = int(rng.integers(2, 13)), int(rng.integers(2, 50))
  return (f"What is {a} times {b}? Reply with the number only.", str(a * b), str(a * b + a))


def _sort(rng):
  xs = [int(x) for x in rng.choice(100, size=int(rng.integers(3, 7)), replace=False)]
  good = sorted(xs)
  bad = good[:]
  bad[0], bad[1] = bad[1], bad[0]
  return ("Sort these numbers from smallest to largest, separated by commas: "
          f"{', '.join(map(str, xs))}", ", ".join(map(str, good)), ", ".join(map(str, bad)))


def _upper(rng):
  words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(1, 4)), replace=False)]
  text = " ".join(words)
  return (f"Write this in capital letters: {text}", text.upper(), text.title())


def _reverse_words(rng):
  words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(3, 6)), replace=False)]
  good = " ".join(reversed(words))
  return (f"Reverse the order of these words: {' '.join(words)}", good, " ".join(words))


def _extract_year(rng):
  year, other = int(rng.integers(1800, 2020)), int(rng.integers(1, 400))
  place, verb = str(rng.choice(_PLACES)), str(rng.choice(_VERBS))
  return (f"In which year did {place} in this sentence open? Reply with the year only. "
          f"\"After {other} days of work, {place} {verb} in {year}.\"", str(year), str(other))


_MAKERS: dict[str, Callable] = {"add": _add, "multiply": _multiply, "sort": _sort,
                                "upper": _upper, "reverse_words": _reverse_words,
                                "extract_year": _extract_year}


def problems(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """`n` {"task", "question", "answer", "wrong"} rows, tasks taking turns, seeded."""
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    raise ValueError(f"tasks {list(tasks)}: each must be one of {list(TASKS)}")
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    task = tasks[i % len(tasks)]
    question, answer, wrong = _MAKERS[task](rng)
    out.append({"task": task, "question": question, "answer": answer, "wrong": wrong})
  return out


SYSTEM = "Answer with the result alone."


def _conversation(question: str) -> list[dict]:
  # The short system turn also keeps a template's long default one out of the rows.
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def chats(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """`n` {"task", "messages": [system, user, assistant]} SFT rows of `problems`."""
  return [{"task": p["task"], "messages": _conversation(p["question"]) + [
      {"role": "assistant", "content": p["answer"]}]} for p in problems(n, seed, tasks)]


def pairs(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """`n` {"task", "messages": [system, user], "chosen", "rejected"} preference rows of
  `problems`: the right answer against its plausible wrong one."""
  return [{"task": p["task"], "messages": _conversation(p["question"]), "chosen": p["answer"],
           "rejected": p["wrong"]} for p in problems(n, seed, tasks)]


def prompts(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """`n` {"task", "messages": [system, user], "answer"} rows of `problems`: prompts for
  reinforcement learning, scored by their answer (`jaxllm.rl.rewards.exact_match`)."""
  return [{"task": p["task"], "messages": _conversation(p["question"]), "answer": p["answer"]}
          for p in problems(n, seed, tasks)]


def write_jsonl(rows: list[dict], path: str) -> None:
  """`rows` as JSONL at `path`, written whole under a temporary name and renamed."""
  tmp = f"{path}.partial-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
