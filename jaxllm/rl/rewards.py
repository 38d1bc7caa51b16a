"""Rewards of sampled completions: functions of code for verifiable tasks, a trained reward
model, or a weighted sum of both.

A reward function is `fn(record, completion) -> float`: `record` is the prompt's JSONL record
(its "answer", "pattern", "tests" and any field of the user's own), `completion` the sampled
reply's text. Built in (`rl.rewards`): exact_match, final_number, regex and unit_test; any
`module:function` importable on the path is one too. `Scorer` runs each under a time limit:
a function that raises, runs past `rl.reward_timeout_s` or returns NaN makes that completion's
reward NaN (counted by kind in `Scored.failures`); the RL step leaves such completions out
rather than stopping the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

import numpy as np

RewardFn = Callable[[dict, str], float]


class RewardTimeout(Exception):
  """A reward function ran past its time limit."""


def normalise(text: str) -> str:
  """Whitespace collapsed, trailing full stop dropped: what exact_match compares."""
  return " ".join(str(text).split()).rstrip(".").strip()


def exact_match(record: dict, completion: str) -> float:
  """1 when the reply is the record's "answer" (`normalise`d), else 0."""
  return float(normalise(completion) == normalise(record["answer"]))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
  found = _NUMBER.findall(str(text))
  if not found:
    return None
  try:
    return float(found[-1].replace(",", ""))
  except ValueError:
    return None


def final_number(record: dict, completion: str) -> float:
  """1 when the reply's last number equals the record's "answer" (a number), else 0: the
  usual check of math tasks whose replies reason before answering."""
  got, want = _number(completion), _number(record["answer"])
  return float(got is not None and want is not None and math.isclose(got, want))


def regex(record: dict, completion: str) -> float:
  """1 when the record's "pattern" (a Python regular expression) matches anywhere in the
  reply, else 0."""
  return float(re.search(record["pattern"], completion) is not None)


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def code_of(completion: str) -> str:
  """The reply's first fenced code block, or the whole reply when it has none."""
  found = _CODE_BLOCK.search(completion)
  return found.group(1) if found else completion


def unit_test(record: dict, completion: str, timeout_s: float = 5.0) -> float:
  """1 when the record's "tests" (Python, e.g. asserts) pass after the reply's code, run in a
  fresh `python -I` subprocess in an empty temporary directory; 0 when they fail.
  RewardTimeout past `timeout_s` (the subprocess is killed)."""
  program = code_of(completion) + "\n\n" + record["tests"] + "\n"
  with tempfile.TemporaryDirectory(prefix="jaxllm-reward-") as cwd:
    path = os.path.join(cwd, "candidate.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(program)
    try:
      done = subprocess.run([sys.executable, "-I", path], cwd=cwd, capture_output=True,
                            timeout=timeout_s, env={"PATH": os.environ.get("PATH", "")})
    except subprocess.TimeoutExpired:
      raise RewardTimeout(f"the tests ran past {timeout_s} s") from None
  return float(done.returncode == 0)


BUILT_IN: dict[str, RewardFn] = {"exact_match": exact_match, "final_number": final_number,
                                 "regex": regex, "unit_test": unit_test}
# What each built-in reads from a record (checked once for every record before training).
NEEDS = {"exact_match": "answer", "final_number": "answer", "regex": "pattern",
         "unit_test": "tests"}


def resolve(name: str) -> RewardFn:
  """A built-in reward's function, or `module:function` imported; ValueError otherwise."""
  if name in BUILT_IN:
    return BUILT_IN[name]
  module, _, attr = name.partition(":")
  if not module or not attr:
    raise ValueError(f"reward {name!r} is neither one of {', '.join(BUILT_IN)} nor "
                     "module:function")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"reward {name!r}: {e}") from None
  if not callable(fn):
    raise ValueError(f"reward {name!r} is not callable")
  return fn


def check_records(records: Sequence[tuple[int, dict]], names: Sequence[str], path: str) -> None:
  """ValueError naming the first record (by line) that lacks a field a built-in reward reads
  or has no prompt."""
  for line, record in records:
    if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
      raise ValueError(f"{path}:{line}: a record needs \"prompt\" or \"messages\"")
    for name in names:
      field = NEEDS.get(name)
      if field is not None and not isinstance(record.get(field), str):
        raise ValueError(f"{path}:{line}: reward {name} needs a string \"{field}\"")


@dataclasses.dataclass
class Scored:
  """Rewards `[N]` (NaN where a function failed), each function's own `[N]` by name, and how
  many calls failed by kind (error, timeout, nan)."""
  rewards: np.ndarray
  parts: dict[str, np.ndarray]
  failures: dict[str, int]


class Scorer:
  """A weighted sum of reward functions (and of a reward model's scores, `model`:
  `(records, completions) -> [N] scores`), each call under a time limit."""

  def __init__(self, names: Sequence[str], weights: Sequence[float] = (),
               timeout_s: float = 5.0, model: Callable | None = None,
               model_weight: float = 1.0):
    self.names = list(names)
    self.fns = [resolve(n) for n in self.names]
    self.weights = [float(w) for w in weights] or [1.0] * len(self.fns)
    self.timeout_s = timeout_s
    self.model, self.model_weight = model, model_weight

  def _run_all(self, fn: RewardFn, records: Sequence[dict], texts: Sequence[str]) -> list:
    """Each call's float, the exception it raised, or "timeout". Every call runs at once in
    a daemon thread (not a process: most rewards are quick string checks, and unit_test
    starts its own subprocess, which enforces its limit itself), so one deadline covers them
    all; a call still running at the deadline is abandoned (its thread ends when it returns,
    and never holds up the process's exit)."""
    outcomes: list = ["timeout"] * len(texts)

    def call(i):
      try:
        if fn is unit_test:
          outcomes[i] = unit_test(records[i], texts[i], self.timeout_s)
        else:
          outcomes[i] = float(fn(records[i], texts[i]))
      except Exception as e:  # noqa: BLE001 - a reward function failing is data, not a crash
        outcomes[i] = e

    threads = [threading.Thread(target=call, args=(i,), daemon=True, name="reward")
               for i in range(len(texts))]
    for t in threads:
      t.start()
    deadline = time.monotonic() + self.timeout_s + (1.0 if fn is unit_test else 0.0)
    for t in threads:
      t.join(max(0.0, deadline - time.monotonic()))
    return list(outcomes)

  def score(self, records: Sequence[dict], completions: Sequence[str]) -> Scored:
    N = len(completions)
    failures = {"error": 0, "timeout": 0, "nan": 0}
    total = np.zeros(N, np.float64)
    parts = {}
    for fn, name, w in zip(self.fns, self.names, self.weights):
      values = np.full(N, np.nan)
      for i, outcome in enumerate(self._run_all(fn, records, completions)):
        if isinstance(outcome, (str, RewardTimeout)):
          failures["timeout"] += 1
        elif isinstance(outcome, BaseException):
          failures["error"] += 1
        elif not math.isfinite(outcome):
          failures["nan"] += 1
        else:
          values[i] = outcome
      parts[name] = values
      total += w * values
    if self.model is not None:
      scores = np.asarray(self.model(records, completions), np.float64)
      bad = ~np.isfinite(scores)
      failures["nan"] += int(bad.sum())
      parts["reward_model"] = np.where(bad, np.nan, scores)
      total += self.model_weight * parts["reward_model"]
    return Scored(total, parts, failures)


def find_reward_model(path: str) -> tuple[str, str]:
  """(the directory `jaxllm.load` reads or an adapter's, its score.safetensors) of a
  `jaxllm reward` result: its workdir, or the adapter/ or model/ directory in it."""
  for d in (path, os.path.join(path, "adapter"), os.path.join(path, "model")):
    head = os.path.join(d, "score.safetensors")
    if os.path.isfile(head):
      return d, head
  raise ValueError(f"{path} holds no reward model (no score.safetensors in it or its "
                   "adapter/ or model/ directory): train one with `jaxllm reward`")


def read_reward_model(path: str):
  """(the `jaxllm.load`ed language model, its head `[D]`) of a reward model: a `jaxllm reward`
  result (its workdir, or the adapter/ or model/ in it: an adapter on the base it names, or a
  full model), or a Hugging Face `...ForSequenceClassification` directory with one label (as
  `jaxllm convert --format=hf-reward` writes; a model whose head is tied to its embedding,
  since such a directory holds no lm_head)."""
  import jaxllm
  from jaxllm.train import reward
  config = os.path.join(path, "config.json")
  if os.path.isfile(config):
    with open(config) as f:
      architectures = json.load(f).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
      return jaxllm.load(path), reward.load_head(os.path.join(path, "model.safetensors"))
  model_dir, head_path = find_reward_model(path)
  if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
    with open(os.path.join(model_dir, "adapter_config.json")) as f:
      base = json.load(f).get("base_model_name_or_path", "")
    if not base or not os.path.exists(base):
      raise ValueError(f"the reward adapter at {model_dir} names a base {base!r} that is not "
                       "here")
    return jaxllm.load(base, adapter=model_dir), reward.load_head(head_path)
  return jaxllm.load(model_dir), reward.load_head(head_path)


def load_reward_model(path: str, max_seq_len: int, batch_size: int = 8):
  """A `(records, completions) -> [N] scores` function of the reward model at `path`
  (`read_reward_model`), for `Scorer(model=...)`: each record's prompt and completion
  rendered with the reward model's own tokenizer as its training pairs were
  (`data.preference.reply_example`), cut to its last `max_seq_len` tokens."""
  import jax
  import jax.numpy as jnp

  from jaxllm.data import preference
  from jaxllm.train import reward
  loaded, head = read_reward_model(path)
  params = {"model": loaded.params, reward.HEAD: head}
  T = min(max_seq_len, loaded.config.max_seq_len)
  fn = jax.jit(lambda p, b: reward.sequence_scores(loaded.graphdef, p, b))

  def score(records, completions):
    rows = [preference.reply_example(r, c, loaded.tokenizer).ids.tolist()
            for r, c in zip(records, completions)]
    out = []
    for i in range(0, len(rows), batch_size):
      chunk = rows[i:i + batch_size]
      inputs = np.zeros((batch_size, T), np.int32)
      seg = np.zeros((batch_size, T), np.int32)
      last = np.zeros(batch_size, np.int32)
      for j, r in enumerate(chunk):
        r = r[-T:]
        inputs[j, :len(r)], seg[j, :len(r)], last[j] = r, 1, len(r) - 1
      pos = np.broadcast_to(np.arange(T, dtype=np.int32), (batch_size, T))
      s = fn(params, {"inputs": jnp.asarray(inputs), "positions": jnp.asarray(pos),
                      "segment_ids": jnp.asarray(seg), "last": jnp.asarray(last)})
      out.extend(np.asarray(s)[:len(chunk)].tolist())
    return np.asarray(out)

  return score
