"""Supervised fine-tuning of SmolLM2-135M-Instruct with LoRA on JSONL chats, sized for a laptop
CPU: 8 x 128-token rows per step, rank-16 adapters on every projection (q k v o gate up down),
learning rate 1e-3 with 10 warm-up steps (adapters start at zero and take a larger rate than
full fine-tuning; for `--config.finetune.method=full` use about 2e-5).

python -m jaxllm.data instructions --out=runs/instructions.jsonl
python -m jaxllm.sft --base=$(python -m jaxllm.fetch smollm2-135m) \\
    --data=runs/instructions.jsonl --workdir=runs/sft_smollm2
python -m jaxllm.generate --checkpoint=$(python -m jaxllm.fetch smollm2-135m) \\
    --adapter=runs/sft_smollm2/adapter --chat="What is 12 + 30? Reply with the number only."

Presets for an 8B base on accelerators (`experiments.FINETUNE_8B_PRESETS`): `:h100-8b`
(QLoRA on one 80 GB GPU), `:gpu8-8b` (LoRA, --mesh=fsdp=8), `:v5p-8b` (LoRA on a v5p-8,
--mesh=fsdp=4); plan one first:
python -m jaxllm.plan --config=experiments/sft_smollm2.py:h100-8b --base=experiments/llama3_8b.py
"""

import ml_collections

import experiments
from jaxllm import config as config_lib


def get_config(preset: str = "laptop") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "sft_smollm2"
  # Every key from the defaults, so each can be overridden on the command line.
  c.finetune = dict(config_lib.defaults("finetune"), method="lora", eval_fraction=0.1,
                    eval_generate=16)
  c.lora = dict(config_lib.defaults("lora"), rank=16, alpha=32.0)
  c.dpo = config_lib.defaults("dpo")
  c.train = dict(config_lib.defaults("train"), steps=100, batch_size=8, seq_len=128, lr=1e-3,
                 warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0,
                 log_every=10, eval_every=50, eval_batches=8, checkpoint_every=50)
  return experiments.apply_finetune_preset(c, preset)
