"""Hang detection: a thread that reports a phase of the loop (a step, an evaluation, a save)
running past its timeout.

A hung collective or a wedged host never returns to Python, so the report comes from a thread
of its own: one line naming the process, the phase and how long it has run, then every
thread's stack (faulthandler), and with `exit_code` the process exits for a supervisor (a
queued-resource script, a Kubernetes job) to restart it from its newest checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable

EXIT_CODE = 75  # EX_TEMPFAIL: a supervisor should run the same command again


class Watchdog:
  """`beat(phase)` when a phase starts; a phase older than `timeout_s` is reported once."""

  def __init__(self, timeout_s: float, process_index: int = 0, *, exit_code: int | None = None,
               report: Callable[[str], None] | None = None, poll_s: float | None = None):
    self.timeout_s = timeout_s
    self._process = process_index
    self._exit_code = exit_code
    self._report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    self._poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 4)
    self._lock = threading.Lock()
    self._phase: str | None = None  # None: disarmed (the first step's compilation)
    self._since = time.monotonic()
    self._reported = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="jaxllm-watchdog", daemon=True)

  def __enter__(self) -> "Watchdog":
    if self.timeout_s > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def beat(self, phase: str | None) -> None:
    """Phase `phase` starts now (None disarms until the next beat)."""
    with self._lock:
      self._phase, self._since, self._reported = phase, time.monotonic(), False

  def _run(self) -> None:
    while not self._stop.wait(self._poll_s):
      with self._lock:
        phase, age, reported = self._phase, time.monotonic() - self._since, self._reported
        if phase is None or reported or age <= self.timeout_s:
          continue
        self._reported = True
      self._report(f"watchdog: process {self._process}: {phase} has run {age:.1f} s, past "
                   f"train.watchdog_s={self.timeout_s:g}"
                   + (f"; exiting with status {self._exit_code} for a restart"
                      if self._exit_code is not None else "") + "; stacks follow")
      try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
      except (ValueError, OSError, AttributeError):  # a stderr without a file descriptor
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
      if self._exit_code is not None:
        sys.stderr.flush()
        os._exit(self._exit_code)  # the main thread is stuck: no clean shutdown is possible
