"""Loss-spike and divergence recovery: what counts as a bad step, and which batches are skipped.

A bad step (non-finite loss or gradient norm, or a spike: the loss above `spike_loss_factor`
times its median over the last `spike_window` good steps, or the gradient norm above
`spike_grad_factor` times its own) makes the loop roll back to its newest
checkpoint and discard that step's batch when it gets there again. The skips are kept in the
workdir's `skipped_batches.json` (beside `train.skip_steps`, the user's own), so a restart from
an older checkpoint skips them too: the run then equals one that never saw those batches.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
from typing import Any

from jaxllm import config as config_lib

SKIPS_FILE = "skipped_batches.json"


class SpikeDetector:
  """Running medians of the loss and the gradient norm over the last `window` good steps."""

  def __init__(self, loss_factor: float, grad_factor: float, window: int):
    self.factors, self.window = (loss_factor, grad_factor), window
    self._history: collections.deque[tuple[int, float, float]] = collections.deque(
        maxlen=window)

  def verdict(self, step: int, loss: float, grad_norm: float) -> str | None:
    """Why step `step` is bad (None: it is good, and joins the history)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      return f"non-finite loss {loss} / grad norm {grad_norm}"
    if len(self._history) == self.window:
      for name, value, factor, column in (("loss", loss, self.factors[0], 1),
                                          ("grad norm", grad_norm, self.factors[1], 2)):
        median = statistics.median(row[column] for row in self._history)
        if factor > 0 and value > factor * median:
          return (f"{name} {value:.4g} above {factor:g} x its median {median:.4g} over the "
                  f"last {self.window} steps")
    self._history.append((step, loss, grad_norm))
    return None

  def rewind(self, step: int) -> None:
    """Forgets the steps after `step` (they are trained again after a rollback)."""
    while self._history and self._history[-1][0] > step:
      self._history.pop()


class SkippedBatches:
  """How many batches to discard before each step draws its own: the config's `skip_steps`
  plus the rollbacks' records in `workdir/skipped_batches.json` (written by process 0)."""

  def __init__(self, workdir: str, configured: tuple[int, ...], writer: bool):
    self._path = os.path.join(workdir, SKIPS_FILE)
    self._writer = writer
    self.records: list[dict[str, Any]] = []
    if os.path.exists(self._path):
      try:
        with open(self._path) as f:
          self.records = json.load(f)["skipped"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise config_lib.ConfigError(f"{self._path} is unreadable ({e}); fix or remove it") \
            from None
    self._configured = collections.Counter(configured)

  def count(self, step: int) -> int:
    """Batches to discard before step `step` draws the one it trains on."""
    return self._configured[step] + sum(1 for r in self.records if r["step"] == step)

  def add(self, step: int, reason: str) -> None:
    self.records.append({"step": step, "reason": reason})
    if not self._writer:
      return
    tmp = f"{self._path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"skipped": self.records}, f, indent=1)
      f.write("\n")
    os.replace(tmp, self._path)  # a crash mid-write leaves the previous list
