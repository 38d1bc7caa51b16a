"""A reward model from SmolLM2-135M-Instruct with LoRA on JSONL preference pairs, sized for a
laptop CPU: 4 pairs (8 sequences of 128 tokens) per step, rank-16 adapters on every
projection and the scalar head, learning rate 5e-4.

python -m jaxllm.data instructions --format=pairs --out=runs/pairs.jsonl
python -m jaxllm.reward --base=$(python -m jaxllm.fetch smollm2-135m) \\
    --data=runs/pairs.jsonl --workdir=runs/reward_smollm2

Presets for an 8B base on accelerators, as dpo_smollm2.py's: `:h100-8b`, `:gpu8-8b`,
`:v5p-8b`.
"""

import ml_collections

import experiments
from jaxllm import config as config_lib


def get_config(preset: str = "laptop") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "reward_smollm2"
  c.finetune = dict(config_lib.defaults("finetune"), method="lora", eval_fraction=0.1,
                    eval_generate=0)
  c.lora = dict(config_lib.defaults("lora"), rank=16, alpha=32.0)
  c.dpo = config_lib.defaults("dpo")
  c.train = dict(config_lib.defaults("train"), steps=100, batch_size=4, seq_len=128, lr=5e-4,
                 warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0,
                 log_every=10, eval_every=50, eval_batches=8, checkpoint_every=50)
  return experiments.apply_finetune_preset(c, preset, rows_per_example=2)
