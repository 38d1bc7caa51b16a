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

from absl import app

from jaxllm.cli import common, finetune

_FLAGS = finetune.define_flags("dpo_smollm2.py", "JSONL pairs: {\"prompt\" or \"messages\", "
                                "\"chosen\", \"rejected\"} per line.")


@common.one_line_errors
def main(argv):
  finetune.main("dpo", _FLAGS, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
