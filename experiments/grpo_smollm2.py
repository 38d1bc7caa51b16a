"""GRPO of SmolLM2-135M-Instruct with LoRA on prompts with checkable answers, sized for a
laptop CPU: 2 prompts x 8 completions of up to 24 tokens per step, sampled at temperature 0.7
by the engine from the policy's current weights; reward 1 when the reply's last number is the
answer (`final_number`); rank-16 adapters on every projection, learning rate 2e-4, KL to the
base 0.04. `--config.rl.algorithm=ppo` trains by PPO instead (a value head on the policy,
GAE, the KL in the reward).

python -m jaxllm.data instructions --format=prompts --tasks=multiply --out=runs/multiply.jsonl
python -m jaxllm.rl --base=$(python -m jaxllm.fetch smollm2-135m) \\
    --data=runs/multiply.jsonl --workdir=runs/grpo_smollm2

Presets for an accelerator (one device: rollouts and updates share it): `:h100-8b`, QLoRA of
an 8B base on one 80 GB GPU, 8 prompts x 8 completions of up to 512 tokens; `:v5e-1b`, LoRA
of a 1B base on one 16 GB TPU v5e chip, 8 x 8 of up to 256. Neither has run here (no GPU or
TPU in this project's sessions so far).
"""

import ml_collections

from jaxllm import config as config_lib

PRESETS = {
    "h100-8b": dict(finetune=dict(method="qlora", remat="full", compute_dtype="bfloat16"),
                    rl=dict(prompts_per_step=8, group_size=8, max_new_tokens=512,
                            temperature=1.0, minibatches=4, max_slots=64),
                    train=dict(seq_len=1024, grad_accum=4, steps=500, lr=1e-5,
                               eval_every=50, checkpoint_every=50)),
    "v5e-1b": dict(finetune=dict(method="lora", remat="full", compute_dtype="bfloat16"),
                   rl=dict(prompts_per_step=8, group_size=8, max_new_tokens=256,
                           temperature=1.0, minibatches=4, max_slots=64),
                   train=dict(seq_len=512, grad_accum=2, steps=500, lr=5e-5,
                              eval_every=50, checkpoint_every=50)),
}


def get_config(preset: str = "laptop") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "grpo_smollm2"
  c.finetune = dict(config_lib.defaults("finetune"), method="lora", eval_fraction=0.1,
                    eval_generate=0)
  c.lora = dict(config_lib.defaults("lora"), rank=16, alpha=32.0)
  c.dpo = config_lib.defaults("dpo")
  c.rl = dict(config_lib.defaults("rl"), algorithm="grpo", prompts_per_step=2, group_size=8,
              max_new_tokens=24, temperature=0.7, kl_beta=0.04, rewards=("final_number",),
              eval_prompts=32)
  c.train = dict(config_lib.defaults("train"), steps=50, batch_size=4, seq_len=64, lr=2e-4,
                 warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0,
                 log_every=1, eval_every=25, checkpoint_every=25)
  if preset != "laptop":
    if preset not in PRESETS:
      raise ValueError(f"unknown preset {preset!r} (laptop, {', '.join(PRESETS)})")
    for section, values in PRESETS[preset].items():
      c[section].update(values)
  return c
