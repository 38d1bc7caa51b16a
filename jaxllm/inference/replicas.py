"""Data-parallel serving: several engines on disjoint device groups behind one interface.

`Replicas` has the engine's interface (`submit`, `cancel`, `metrics`, `start`, `shutdown`), so
the HTTP server takes either. Each request goes to one replica for its whole life:

  - prefix affinity first: a replica whose prefix cache already holds the prompt's first pages
    takes it, unless it is busier than the least-loaded replica by more than `slack` requests
    (a shared system prompt then stays on one replica instead of being cached on all);
  - otherwise the least-loaded replica (waiting + running requests), lowest index on ties.
"""

from __future__ import annotations

import threading
from typing import Sequence

from jaxllm.inference import engine as engine_lib
from jaxllm.inference import sampling


class Replicas:

  def __init__(self, engines: Sequence[engine_lib.Engine], *, slack: int | None = None):
    if not engines:
      raise ValueError("Replicas needs at least one engine")
    self.engines = list(engines)
    # How much busier an affine replica may be: half a replica's batch by default.
    self.slack = engines[0].config.max_slots // 2 if slack is None else slack
    self._owner: dict[int, engine_lib.Engine] = {}  # id(request) -> its engine, while live
    self._lock = threading.Lock()
    self.routed = [0] * len(self.engines)

  def load(self, i: int) -> int:
    """Requests replica i holds: waiting and running."""
    m = self.engines[i].metrics()
    return m["queue_depth"] + m["active_slots"]

  def choose(self, prompt: Sequence[int], adapter: int = 0) -> int:
    loads = [self.load(i) for i in range(len(self.engines))]
    least = min(loads)
    cached = [e.prefix_cache.cached_pages(prompt, adapter) for e in self.engines]
    best = max(range(len(self.engines)), key=lambda i: (cached[i], -loads[i], -i))
    if cached[best] and loads[best] <= least + self.slack:
      return best
    return loads.index(least)

  def submit(self, prompt: Sequence[int], params: sampling.SamplingParams, *,
             request_id: str | None = None, on_token=None, on_finish=None, adapter: int = 0,
             constraint=None) -> engine_lib.Request:
    with self._lock:
      i = self.choose(prompt, adapter)
      engine = self.engines[i]

      def finished(request):
        with self._lock:
          self._owner.pop(id(request), None)
        if on_finish is not None:
          on_finish(request)

      request = engine.submit(prompt, params, request_id=request_id, on_token=on_token,
                              on_finish=finished, adapter=adapter, constraint=constraint)
      self._owner[id(request)] = engine
      self.routed[i] += 1
    return request

  # Every replica holds the same model: what the server reads of one engine (its weights for
  # a scoring pass, its context length) is replica 0's.
  @property
  def graphdef(self):
    return self.engines[0].graphdef

  @property
  def params(self):
    return self.engines[0].params

  @property
  def max_seq_len(self) -> int:
    return self.engines[0].max_seq_len

  lockstep = False  # replicas serve one process's devices (the server refuses both at once)

  @property
  def failure(self) -> Exception | None:
    """The first replica's error that stopped its loop, if any did."""
    return next((e.failure for e in self.engines if e.failure is not None), None)

  def cancel(self, request: engine_lib.Request) -> None:
    with self._lock:
      engine = self._owner.get(id(request))
    if engine is not None:
      engine.cancel(request)

  def metrics(self) -> dict:
    """The engines' metrics summed (counters and gauges alike), plus each replica's own."""
    each = [e.metrics() for e in self.engines]
    total: dict = {}
    for m in each:
      for key, value in m.items():
        total[key] = total.get(key, 0) + value
    total["replicas"] = each
    return total

  def start(self) -> None:
    for e in self.engines:
      e.start()

  def shutdown(self) -> None:
    for e in self.engines:
      e.shutdown()
