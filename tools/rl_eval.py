"""Held-out reward of a base model and of adapters trained on it, all scored the same way:
greedy replies (the engine, as `jaxllm rl` evaluates) to the prompts of a JSONL file, scored by
`jaxllm.rl.rewards` functions. One JSON line per model: {"model", "reward_mean", "n",
"seconds"}; issue 43's GRPO / PPO / DPO rows (tools/rl_experiment.sh) come from it.

python tools/rl_eval.py --base=MODEL --data=HELD_OUT.jsonl [--adapter=NAME=DIR ...]
    [--rewards=final_number] [--max_new_tokens=24]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True)
  parser.add_argument("--data", required=True)
  parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR")
  parser.add_argument("--rewards", default="final_number")
  parser.add_argument("--max_new_tokens", type=int, default=24)
  args = parser.parse_args()

  import jaxllm
  from jaxllm.rl import prompts as prompts_lib
  from jaxllm.rl import rewards, rollout
  records = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
  scorer = rewards.Scorer(args.rewards.split(","))
  models = [("base", None)] + [tuple(a.split("=", 1)) for a in args.adapter]
  for name, adapter in models:
    model = jaxllm.load(args.base, adapter=adapter)
    prompts = [prompts_lib.prompt_ids(r, model) for r in records]
    longest = max(len(p) for p in prompts) + args.max_new_tokens + 1
    sampler = rollout.Sampler(model.graphdef, model.params, eos_id=model.tokenizer.eos_id,
                              max_seq_len=longest, max_slots=16)
    began = time.perf_counter()
    comps, _ = sampler.sample(model.params, prompts, [0] * len(prompts),
                              max_tokens=args.max_new_tokens, temperature=0.0)
    texts = [model.tokenizer.decode(c.tokens) for c in comps]
    scored = scorer.score(records, texts)
    print(json.dumps({"model": name, "reward_mean": float(np.nanmean(scored.rewards)),
                      "n": len(records), "seconds": round(time.perf_counter() - began, 1),
                      "example": texts[0]}), flush=True)


if __name__ == "__main__":
  main()
