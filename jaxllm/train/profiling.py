"""Where training time goes: compilations of the jitted steps, and a profiler trace window.

`CompileLog` listens to JAX's compile-duration events (`jax.monitoring`) while it is open and
attributes them to the jitted functions it watches (by name: `train_step`, `eval_step`), so the
loop can log each compilation's seconds and count, and warn when the train step compiles again
for inputs it has compiled before (a changed dtype, weak type or sharding: every such step pays
the whole compile time again).

`TraceWindow` runs `jax.profiler` over steps START .. START + COUNT - 1 and writes the trace
into a directory (the workdir's tb/: `plugins/profile/<run>/<host>.xplane.pb`, which
TensorBoard's profile plugin and Perfetto read).
"""

from __future__ import annotations

import collections

import jax

# The phases of one compilation: tracing to a jaxpr, lowering to StableHLO, XLA's compile.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_EVENT = _COMPILE_EVENTS[-1]


class CompileLog:
  """Counts and times the compilations of the watched jitted functions while open."""

  def __init__(self, names: tuple[str, ...]):
    self._names = names
    self._seconds: dict[str, float] = collections.defaultdict(float)
    self._new: dict[str, int] = collections.defaultdict(int)
    self.counts: dict[str, int] = collections.defaultdict(int)

  def _listen(self, event: str, seconds: float, **kwargs) -> None:
    if event not in _COMPILE_EVENTS:
      return
    name = str(kwargs.get("fun_name", ""))
    name = name[4:-1] if name.startswith("jit(") else name
    if name not in self._names:
      return
    self._seconds[name] += seconds
    if event == _BACKEND_EVENT:  # once per compilation
      self._new[name] += 1
      self.counts[name] += 1

  def take(self) -> dict[str, tuple[int, float]]:
    """{name: (compilations, seconds)} since the last call, for names that compiled."""
    out = {name: (n, self._seconds[name]) for name, n in self._new.items() if n}
    self._new.clear()
    self._seconds.clear()
    return out

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


class TraceWindow:
  """A jax.profiler trace over steps [start, start + count), written to `log_dir`.

  `before(step)` before a step runs, `after(step, outputs)` once it returned (it waits for the
  outputs, so the trace holds the step's device work); `close()` ends a trace still open."""

  def __init__(self, window: tuple[int, int] | None, log_dir: str):
    self._start, self.count = window or (0, 0)
    self._stop = self._start + self.count
    self._log_dir = log_dir
    self.active = False

  def before(self, step: int) -> None:
    if step == self._start:
      jax.profiler.start_trace(self._log_dir)
      self.active = True

  def after(self, step: int, outputs) -> bool:
    """True when this step closed the trace."""
    if self.active and step == self._stop - 1:
      jax.block_until_ready(outputs)
      self.close()
      return True
    return False

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
