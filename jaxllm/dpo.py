"""`python -m jaxllm.dpo --base=PATH --data=PAIRS.jsonl [--config=EXPERIMENT]
[--config.dpo.loss=sigmoid|ipo|simpo] [--config.dpo.beta=0.1] [--workdir=DIR]`
(or `jaxllm dpo ...`)

Preference optimisation of any checkpoint `jaxllm.load` reads on JSONL pairs
(`{"prompt" | "messages", "chosen", "rejected"}`, `jaxllm.data.preference`): DPO (`sigmoid`,
with `dpo.label_smoothing` for conservative DPO), IPO or SimPO (`jaxllm.train.preference`).
The reference is the starting model (for LoRA, the base with the adapters at zero); its
log-probabilities are computed once before training. Methods, held-out metrics (loss, reward
margin and accuracy), exact match of greedy replies against the chosen ones, workdir, resume
the result (`adapter/` or `model/`) and `--mesh` are `python -m jaxllm.sft`'s.
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxllm.cli import common

_CONFIG = common.define_config_flag(os.path.join(
    os.path.dirname(common.default_experiment()), "dpo_smollm2.py"))
_BASE = flags.DEFINE_string("base", None, "The model to tune: workdir, jaxllm/HF directory "
                            "or .gguf.")
_DATA = flags.DEFINE_string("data", None, "JSONL pairs: {\"prompt\" or \"messages\", "
                            "\"chosen\", \"rejected\"} per line.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_KEEP_FREED_MEMORY = common.define_keep_freed_memory_flag()
_MESH = common.define_mesh_flag()
flags.mark_flags_as_required(["base", "data"])


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.keep_freed_memory(_KEEP_FREED_MEMORY)
  from jaxllm.cli import finetune
  finetune.run("dpo", _CONFIG, _BASE.value, _DATA.value, _WORKDIR.value, _PROGRESS.value,
               _MESH.value)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
