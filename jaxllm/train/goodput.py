"""Goodput: how much of a run's wall time trained new steps, and where the rest went.

Each process start of a run is a session. Process 0 appends the session's running totals to
the workdir's `goodput.jsonl` at every log step and at its end; the file is never rewound (a
resume rewinds metrics.jsonl, not this), so it holds every session of the run. A session's
time is split into:
  productive  steps trained for the first time
  redone      steps trained again: after a restart from an older checkpoint, or a rollback
  startup     process start to the first step (imports, corpus, tokenizer, mesh, init),
              restores excepted
  compile     compilations (train and eval steps)
  checkpoint  the time steps waited for saves
  restore     checkpoint restores (at the start and at rollbacks)
  data        waiting for the data iterator
  eval        held-out evaluations
A session killed without warning loses the time after its last record (at most a log
interval); what it trained after its last checkpoint shows up as the next session's redone
steps.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

GOODPUT_FILE = "goodput.jsonl"
PARTS = ("productive", "redone", "startup", "compile", "checkpoint", "restore", "data", "eval")


def process_start_time() -> float:
  """This process's start (Unix time): from /proc on Linux, else now (imports then count as
  nothing)."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/stat") as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return time.time()


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir/goodput.jsonl` (a line cut short by a kill is left out)."""
  path = os.path.join(workdir, GOODPUT_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


class GoodputClock:
  """One session's running totals; `write()` appends them to goodput.jsonl (process 0)."""

  def __init__(self, workdir: str, *, writer: bool, start_time: float | None = None):
    self._path = os.path.join(workdir, GOODPUT_FILE) if writer else None
    earlier = read_records(workdir) if writer else []
    self.session = 1 + max((r["session"] for r in earlier), default=0)
    # Steps at or below the furthest step any earlier session trained are trained again.
    self.high_water = max((r["high_water"] for r in earlier), default=0)
    self.started = process_start_time() if start_time is None else start_time
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.redone_steps = self.rollbacks = 0
    self.step = 0
    self._first_step_at: float | None = None

  def add(self, part: str, seconds: float) -> None:
    self.seconds[part] += seconds

  def first_step(self) -> None:
    """The loop is about to run its first step: what came before, restores excepted, is
    startup."""
    if self._first_step_at is None:
      self._first_step_at = time.time()
      self.seconds["startup"] = max(0.0, self._first_step_at - self.started
                                    - self.seconds["restore"])

  def step_done(self, step: int, seconds: float) -> None:
    """Step `step` took `seconds` (compilation, data, eval and saves already taken out)."""
    self.step = step
    if step <= self.high_water:
      self.redone_steps += 1
      self.seconds["redone"] += seconds
    else:
      self.high_water = step
      self.seconds["productive"] += seconds

  def elapsed(self) -> float:
    return time.time() - self.started

  def fraction(self) -> float:
    """This session's goodput so far."""
    return self.seconds["productive"] / max(self.elapsed(), 1e-9)

  def scalars(self) -> dict[str, float]:
    """This session's parts so far, in seconds, as TensorBoard scalars (`goodput/<part>_s`)."""
    return {f"goodput/{part}_s": s for part, s in self.seconds.items()}

  def write(self, end: str = "running") -> None:
    """Appends the totals; `end` is running, done, preempted or diverged."""
    if self._path is None:
      return
    record = {"session": self.session, "started": self.started, "time": time.time(),
              "step": self.step, "high_water": self.high_water, "end": end,
              "redone_steps": self.redone_steps, "rollbacks": self.rollbacks,
              **{f"{part}_s": round(s, 4) for part, s in self.seconds.items()}}
    with open(self._path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
  """The run's breakdown over all its sessions (the last record of each)."""
  last: dict[int, dict[str, Any]] = {}
  for r in records:
    last[r["session"]] = r
  sessions = [last[k] for k in sorted(last)]
  wall = sum(r["time"] - r["started"] for r in sessions)
  totals = {f"{part}_s": sum(r.get(f"{part}_s", 0.0) for r in sessions) for part in PARTS}
  accounted = sum(totals.values())
  return {
      "goodput": totals["productive_s"] / wall if wall > 0 else 0.0,
      "restarts": max(len(sessions) - 1, 0),
      "wall_s": wall,
      **totals,
      "other_s": max(wall - accounted, 0.0),
      "redone_steps": sum(r["redone_steps"] for r in sessions),
      "rollbacks": sum(r["rollbacks"] for r in sessions),
      "steps": max((r["high_water"] for r in sessions), default=0),
      "sessions": [{"session": r["session"], "end": r["end"], "step": r["step"],
                    "wall_s": r["time"] - r["started"]} for r in sessions],
  }
