"""`python -m jaxllm.goodput WORKDIR`: where a training run's wall time went, over all restarts.

Reads the workdir's goodput.jsonl (written by `jaxllm.train` and `jaxllm.distill`: see
`jaxllm.train.goodput`), prints one line per session and the breakdown, and last one JSON line
(`goodput` as a fraction of wall time, `restarts`, `compile_s`, `checkpoint_s`, `restore_s`,
`redone_steps` and the other parts).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app

from jaxllm.cli import common
from jaxllm.errors import UserError
from jaxllm.train import goodput as goodput_lib


class GoodputError(UserError, ValueError):
  """The workdir has no goodput records; the message says why."""


def report(workdir: str) -> dict:
  """The breakdown of `workdir`'s run; its table goes to stderr."""
  records = goodput_lib.read_records(workdir)
  if not records:
    where = "not a directory" if not os.path.isdir(workdir) else (
        f"no {goodput_lib.GOODPUT_FILE} in it (written by jaxllm train and distill)")
    raise GoodputError(f"{workdir}: {where}")
  summary = goodput_lib.summarize(records)
  for s in summary["sessions"]:
    print(f"session {s['session']}: {s['wall_s']:8.1f} s wall, at step {s['step']}, "
          f"{s['end']}", file=sys.stderr)
  wall = summary["wall_s"]
  print(f"{'wall':<11} {wall:9.1f} s", file=sys.stderr)
  for part in (*goodput_lib.PARTS, "other"):
    seconds = summary[f"{part}_s"]
    print(f"{part:<11} {seconds:9.1f} s  {100 * seconds / max(wall, 1e-9):5.1f}%",
          file=sys.stderr)
  print(f"goodput {100 * summary['goodput']:.1f}% over {summary['restarts']} restarts; "
        f"{summary['redone_steps']} steps trained again, {summary['rollbacks']} rollbacks",
        file=sys.stderr)
  return summary


@common.one_line_errors
def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m jaxllm.goodput WORKDIR")
  summary = report(argv[1])
  summary.pop("sessions")
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                    for k, v in summary.items()}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
