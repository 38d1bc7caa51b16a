"""`python -m jaxllm.rl --base=PATH --data=PROMPTS.jsonl [--config=EXPERIMENT]
[--config.rl.algorithm=grpo|ppo] [--workdir=DIR]` (or `jaxllm rl ...`)

Reinforcement learning of any checkpoint `jaxllm.load` reads on JSONL prompts
(`{"prompt" | "messages", "answer" | "pattern" | "tests" | ...}`): each step samples
`rl.group_size` completions of `rl.prompts_per_step` prompts from the policy's current weights
with the continuous-batching engine in this process, scores them with rewards from code
(`rl.rewards`: exact_match, final_number, regex, unit_test, module:function) and/or a reward
model (`rl.reward_model`, a `jaxllm reward` result), and updates the policy by GRPO or PPO
(`jaxllm.rl.losses`) with LoRA adapters, QLoRA's or every weight (`finetune.method`).
Held-out greedy reward before and after; metrics.jsonl (reward_mean, kl, entropy,
clip_fraction, rollout_tokens_per_s, ...), checkpoints, resume and `adapter/` (or `model/`)
as `python -m jaxllm.sft`'s.
"""

from __future__ import annotations

from absl import app

from jaxllm.cli import common, finetune

_FLAGS = finetune.define_flags("grpo_smollm2.py", "JSONL prompts: {\"prompt\" or "
                                "\"messages\", and what the rewards read (\"answer\", "
                                "\"pattern\", \"tests\")} per line.")


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jaxllm.cli import rl
  common.keep_freed_memory(_FLAGS["keep_freed_memory"])
  rl.run(_FLAGS["config"], _FLAGS["base"].value, _FLAGS["data"].value,
         _FLAGS["workdir"].value, _FLAGS["progress"].value, _FLAGS["mesh"].value)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
