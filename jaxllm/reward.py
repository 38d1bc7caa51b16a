"""`python -m jaxllm.reward --base=PATH --data=PAIRS.jsonl [--config=EXPERIMENT] [--workdir=DIR]`
(or `jaxllm reward ...`)

Trains a reward model on JSONL preference pairs (`{"prompt" | "messages", "chosen",
"rejected"}`, as `jaxllm.dpo` reads): any checkpoint `jaxllm.load` reads, with a scalar head on
its final hidden state at each sequence's last token, by the Bradley-Terry loss
(`jaxllm.train.reward`). The head trains with LoRA adapters (or every weight, or QLoRA's
adapters: `finetune.method`). It reports held-out pair accuracy (the chosen reply scoring
higher) before and after, and writes `adapter/` (or `model/`) with the head beside it as
`score.safetensors` (`score.weight` `[1, D]`, Hugging Face's name). Workdir, resume and
`--mesh` are `python -m jaxllm.sft`'s.
"""

from __future__ import annotations

from absl import app

from jaxllm.cli import common, finetune

_FLAGS = finetune.define_flags("reward_smollm2.py", "JSONL pairs: {\"prompt\" or \"messages\", "
                                "\"chosen\", \"rejected\"} per line.")


@common.one_line_errors
def main(argv):
  finetune.main("reward", _FLAGS, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
