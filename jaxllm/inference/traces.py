"""How often each jitted inference function was traced (= compiled) in this process.

A counter bumped by the functions' bodies as they trace, read by tests and benchmarks
(`trace_counts`) to check that bucketed shapes keep the number of programs bounded.
"""

import collections

_TRACES: collections.Counter = collections.Counter()


def count_trace(name: str) -> None:
  """Called inside a jitted function's body: runs once per trace, i.e. per compilation."""
  _TRACES[name] += 1


def trace_counts() -> dict[str, int]:
  return dict(_TRACES)
