#!/usr/bin/env bash
# Issue 43's measured runs on SmolLM2-135M-Instruct with LoRA: GRPO and PPO (`jaxllm rl`,
# experiments/grpo_smollm2.py's laptop settings) on products from `python -m jaxllm.data
# instructions --tasks=multiply` (reward 1 when the reply's last number is the product:
# `final_number`), DPO (`jaxllm dpo`) on pairs of the same generator (the right product
# against a wrong one) as a row beside them, and the rollout
# throughput of the engine against plain `generate` inside the same loop. Every model is then
# scored the same way on 64 held-out prompts of another seed (tools/rl_eval.py: greedy replies,
# final_number). Per run: wall time and peak RSS (GNU time), its log, metrics.jsonl and summary
# line; OUT/rl_runs.jsonl, OUT/heldout.jsonl and OUT/reward_curve.png (tools/plot_rl.py).
# Usage: bash tools/rl_experiment.sh OUT [STEPS] [RUNS (default: "grpo ppo dpo rollout")]
set -euo pipefail
OUT=$1
STEPS=${2:-50}
RUNS=${3:-"grpo ppo dpo rollout"}
mkdir -p "$OUT"
BASE=$(python -m jaxllm.fetch smollm2-135m)
python -m jaxllm.data instructions --format=prompts --tasks=multiply --examples=400 \
  --out="$OUT/task.jsonl"
python -m jaxllm.data instructions --format=prompts --tasks=multiply --examples=64 --seed=1 \
  --out="$OUT/task_heldout.jsonl"
python -m jaxllm.data instructions --format=pairs --tasks=multiply --examples=400 \
  --out="$OUT/task_pairs.jsonl"
RL_FLAGS=(--config=experiments/grpo_smollm2.py)
touch "$OUT/rl_runs.jsonl"
timed() {  # name, command...
  local name=$1
  shift
  /usr/bin/time -f '%e %M' -o "$OUT/$name.time" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  read -r wall rss_kb < "$OUT/$name.time"
  tail -1 "$OUT/$name.out" | python -c "import json, sys; r = json.loads(sys.stdin.read()); \
print(json.dumps({'run': '$name', 'wall_s': $wall, 'peak_rss_gb': round($rss_kb / 2**20, 2), \
**{k: r.get(k) for k in ('command', 'algorithm', 'method', 'step', 'reward_mean', 'kl', \
'eval_reward_before', 'eval_reward_after', 'exact_match_before', 'exact_match_after', \
'eval_loss')}}))" | tee -a "$OUT/rl_runs.jsonl"
}
want() { [[ " $RUNS " == *" $1 "* ]]; }
if want grpo; then
  timed grpo python -m jaxllm.rl "${RL_FLAGS[@]}" --base="$BASE" --data="$OUT/task.jsonl" \
    --workdir="$OUT/grpo" --noprogress --config.train.steps="$STEPS"
fi
if want ppo; then
  timed ppo python -m jaxllm.rl "${RL_FLAGS[@]}" --base="$BASE" --data="$OUT/task.jsonl" \
    --workdir="$OUT/ppo" --noprogress --config.train.steps="$STEPS" --config.rl.algorithm=ppo
fi
if want dpo; then
  # experiments/dpo_smollm2.py's laptop settings: 4 pairs (8 sequences) a step
  timed dpo python -m jaxllm.dpo --base="$BASE" --data="$OUT/task_pairs.jsonl" \
    --workdir="$OUT/dpo" --noprogress --config.train.steps="$STEPS" \
    --config.train.eval_every="$STEPS" --config.train.checkpoint_every="$STEPS" \
    --config.finetune.eval_generate=32
fi
if want rollout; then
  # 3 steps each way, same seeds: rollout_tokens_per_s of the engine and of plain generate
  for mode in engine generate; do
    timed "rollout_$mode" python -m jaxllm.rl "${RL_FLAGS[@]}" --base="$BASE" \
      --data="$OUT/task.jsonl" --workdir="$OUT/rollout_$mode" --noprogress \
      --config.train.steps=3 --config.rl.rollout="$mode" --config.rl.eval_prompts=0
  done
fi
adapters=()
for run in grpo ppo dpo; do
  [[ -d "$OUT/$run/adapter" ]] && adapters+=(--adapter="$run=$OUT/$run/adapter")
done
python tools/rl_eval.py --base="$BASE" --data="$OUT/task_heldout.jsonl" "${adapters[@]}" \
  | tee "$OUT/heldout.jsonl"
python tools/plot_rl.py "$OUT/reward_curve.png" "$OUT"/grpo/metrics.jsonl \
  "$OUT"/ppo/metrics.jsonl || echo "no plot (matplotlib missing?)"
