"""`python -m jaxllm.sft --base=PATH --data=FILE.jsonl [--config=EXPERIMENT]
[--config.finetune.method=full|lora|qlora] [--config.train.steps=N ...] [--workdir=DIR]`
(or `jaxllm sft ...`)

Supervised fine-tuning of any checkpoint `jaxllm.load` reads on JSONL chat examples
(`{"messages": [...]}`, rendered with the model's own chat template, loss on the assistant
turns) or prompt/completion pairs (`jaxllm.data.sft`). `finetune.method`: full (every weight),
lora (adapters on the frozen base; the `lora` section shapes them) or qlora (adapters on the
base rounded to int4/int8). A seeded `finetune.eval_fraction` of the examples is held out:
held-out loss during training, and exact match of greedy replies on `finetune.eval_generate`
of them before and after. The workdir keeps metrics.jsonl, checkpoints (the trained part and
its optimizer state; the same command resumes) and the result: `adapter/` (PEFT's format:
`--adapter=` of generate and eval, jaxllm.load(adapter=), `jaxllm lora merge`) or, for full
fine-tuning, `model/` (a jaxllm directory). `--mesh=fsdp=2,tensor=4` (data, fsdp, tensor) splits
the model, its adapters and optimizer state, and each batch's rows over devices.
"""

from __future__ import annotations

from absl import app

from jaxllm.cli import common, finetune

_FLAGS = finetune.define_flags("sft_smollm2.py", "JSONL examples: {\"messages\": [...]} or "
                                "{\"prompt\", \"completion\"} per line.")


@common.one_line_errors
def main(argv):
  finetune.main("sft", _FLAGS, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
