"""`python -m jaxllm.distill --teacher=PATH [--config=STUDENT_EXPERIMENT] [--config.a.b=v ...]
[--workdir=DIR]`

Trains the student experiment on the teacher's softened distribution: the loss is
`distill.alpha` x T² KL(teacher || student) at temperature `distill.temperature` (over the
teacher's `distill.top_k` most likely tokens when > 0) + (1 - alpha) x the hard-label loss, the
teacher (any checkpoint `jaxllm.load` reads) running in the same jitted step. Workdir,
checkpoints, resume, metrics (`kd_loss` beside `loss`, the hard-label NLL) and meshes are those
of `python -m jaxllm.train`; the student tokenizes with the teacher's tokenizer, so its
`model.vocab_size` must be the teacher's, and `distill.init_layers` starts it from a subset of
the teacher's layers. The result is an ordinary checkpoint: `--draft=WORKDIR` makes it a
speculative draft of the teacher.
"""

from __future__ import annotations


from absl import app, flags

from jaxllm.cli import common

_CONFIG = common.define_config_flag(common.default_experiment())
_TEACHER = flags.DEFINE_string("teacher", None, "Teacher checkpoint (workdir, jaxllm/HF "
                               "directory or .gguf).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_KEEP_FREED_MEMORY = common.define_keep_freed_memory_flag()
flags.mark_flags_as_required(["teacher"])


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.keep_freed_memory(_KEEP_FREED_MEMORY)
  cfg = common.experiment(_CONFIG)  # validated before any JAX work
  common.initialize_distributed()
  import jaxllm
  from jaxllm.quant import params as qparams
  from jaxllm.train import distill, loop
  if qparams.QuantSpec.load(_TEACHER.value) is not None:
    raise common.CommandError(f"{_TEACHER.value} is quantized: distill from a float teacher")
  teacher = jaxllm.load(_TEACHER.value)
  workdir = _WORKDIR.value or f"runs/{cfg.name}"
  result = loop.train(cfg, workdir, progress=_PROGRESS.value,
                      teacher=distill.Teacher(teacher.config, teacher.graphdef, teacher.params,
                                              teacher.tokenizer))
  common.finish_training(result, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
