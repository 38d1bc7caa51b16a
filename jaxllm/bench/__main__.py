"""`python -m jaxllm.bench <suite> [--config=...] [--json] [--out=FILE]`

Suites: train (step time, tokens/s, MFU of the configured train step).
"""

from __future__ import annotations

import json

from absl import app, flags

from jaxllm.cli import common

SUITES = ("train",)

_CONFIG = common.define_config_flag(common.default_experiment())
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).", lower_bound=1)


@common.one_line_errors
def main(argv):
  if len(argv) != 2 or argv[1] not in SUITES:
    raise app.UsageError(f"usage: python -m jaxllm.bench {{{'|'.join(SUITES)}}} [flags]")
  from jaxllm import config as config_lib
  cfg = config_lib.from_config_dict(common.config_value(_CONFIG))
  common.initialize_distributed()
  from jaxllm.bench import train
  result = train.run(cfg, steps=_STEPS.value)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result) if _JSON.value else train.table(result))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
