"""`python -m jaxllm.train [--config=experiments/tiny.py] [--config.a.b=v ...] [--workdir=DIR]`

Trains the experiment, or resumes it from the latest checkpoint in the workdir.
"""

from __future__ import annotations


from absl import app, flags

from jaxllm.cli import common

_CONFIG = common.define_config_flag(common.default_experiment())
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_KEEP_FREED_MEMORY = common.define_keep_freed_memory_flag()


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.keep_freed_memory(_KEEP_FREED_MEMORY)
  cfg = common.experiment(_CONFIG)  # validated before any JAX work
  common.initialize_distributed()
  from jaxllm.train import loop
  workdir = _WORKDIR.value or f"runs/{cfg.name}"
  result = loop.train(cfg, workdir, progress=_PROGRESS.value)
  common.finish_training(result, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
