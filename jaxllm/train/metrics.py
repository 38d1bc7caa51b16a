"""Metrics sinks: metrics.jsonl (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsWriter:
  """Appends metric dicts (each with a "step") to metrics.jsonl and TensorBoard.

  On resume from step N, lines written after N by the interrupted run are dropped first (all of
  them on a fresh start), so the file reads as one uninterrupted run.
  """

  def __init__(self, jsonl_path: str | None, tb_dir: str | None,
               resume_step: int | None = None):
    """Both paths None: a writer that discards (processes other than 0 of a multi-host run)."""
    self._file = self._tb = None
    self._path = jsonl_path
    if jsonl_path is None:
      return
    _truncate(jsonl_path, resume_step or 0)
    self._file = open(jsonl_path, "a", buffering=1)
    if tb_dir is not None:
      from tensorboardX import SummaryWriter  # imported late: a heavy import, rank 0 only
      self._tb = SummaryWriter(tb_dir, flush_secs=10)

  def write(self, metrics: dict[str, Any]) -> None:
    if self._file is None:
      return
    self._file.write(json.dumps(metrics, sort_keys=True) + "\n")
    if self._tb is not None:
      step = metrics["step"]
      for key, value in metrics.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
        elif key != "step" and isinstance(value, list):
          self._add_per_layer(key, value, step)

  def write_tensorboard(self, step: int, values: dict[str, float]) -> None:
    """Scalars for TensorBoard alone (the goodput breakdown: goodput.jsonl holds its records)."""
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, step)

  def _add_per_layer(self, key: str, value: list, step: int) -> None:
    """Per-layer lists (MoE load metrics): one scalar per layer, and per expert for `[L, E]`."""
    for layer, v in enumerate(value):
      if isinstance(v, list):
        for expert, x in enumerate(v):
          self._tb.add_scalar(f"{key}/layer{layer}/expert{expert}", x, step)
      else:
        self._tb.add_scalar(f"{key}/layer{layer}", v, step)

  def rewind(self, step: int) -> None:
    """Drops the lines after `step` (a rollback trains those steps again). The TensorBoard
    files keep their events; TensorBoard's reader drops a tag's later points when its steps go
    back (its purge of orphaned data)."""
    if self._file is None:
      return
    self._file.close()
    _truncate(self._path, step)
    self._file = open(self._path, "a", buffering=1)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _truncate(path: str, step: int) -> None:
  """Keeps the lines of steps 0..`step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    # A line cut short by a killed process parses to no step and goes too.
    kept = [line for line in f if 0 <= _step_of(line) <= step]
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _step_of(line: str) -> int:
  try:
    return int(json.loads(line).get("step", -1))
  except (ValueError, AttributeError):
    return -1
