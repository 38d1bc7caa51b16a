#!/usr/bin/env bash
# Issue 42's fine-tuning comparison on SmolLM2-135M-Instruct: the synthetic instructions of
# `python -m jaxllm.data instructions` (sums, products, sorting, upper case, word order, a year
# to extract; a seeded tenth held out), tuned for equal steps by LoRA, QLoRA (int4 base), full
# SFT, and DPO (LoRA) on pairs of each right answer against a plausible wrong one from the same
# generator, and a reward model (LoRA) on the same pairs. Each run's summary line (held-out
# loss, exact match of greedy replies on the held-out prompts before and after; the reward
# model's held-out pair accuracy) with its wall time and peak resident memory (GNU time) goes
# to OUT/sft_runs.jsonl; each run's log and metrics.jsonl stay in OUT.
# Usage: bash tools/sft_experiment.sh OUT [STEPS] [EXAMPLES] [RUNS (default: all, e.g. "lora
# reward_lora")]
set -euo pipefail
OUT=$1
STEPS=${2:-60}
EXAMPLES=${3:-360}
RUNS=${4:-"lora qlora full dpo_lora reward_lora"}
mkdir -p "$OUT"
BASE=$(python -m jaxllm.fetch smollm2-135m)
python -m jaxllm.data instructions --out="$OUT/instructions.jsonl" --examples="$EXAMPLES"
python -m jaxllm.data instructions --format=pairs --out="$OUT/pairs.jsonl" \
  --examples="$EXAMPLES"
: > "$OUT/sft_runs.jsonl"
run() {  # command, name, lr, data, extra flags...
  local command=$1 name=$2 lr=$3 data=$4
  shift 4
  [[ " $RUNS " == *" $name "* ]] || return 0
  /usr/bin/time -f '%e %M' -o "$OUT/$name.time" python -m "jaxllm.$command" --base="$BASE" \
    --data="$OUT/$data" --workdir="$OUT/$name" --noprogress \
    --config.train.steps="$STEPS" --config.train.eval_every="$STEPS" \
    --config.train.checkpoint_every="$STEPS" --config.train.lr="$lr" \
    --config.finetune.eval_generate=1000 "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  read -r wall rss_kb < "$OUT/$name.time"
  tail -1 "$OUT/$name.out" | python -c "import json, sys; r = json.loads(sys.stdin.read()); \
print(json.dumps({'run': '$name', 'wall_s': $wall, 'peak_rss_gb': round($rss_kb / 2**20, 2), \
**{k: r.get(k) for k in ('command', 'method', 'step', 'loss', 'eval_loss', \
'eval_reward_accuracy', 'exact_match_before', 'exact_match_after', 'eval_accuracy', \
'accuracy_before', 'accuracy_after', 'trained_parameters')}}))" \
    | tee -a "$OUT/sft_runs.jsonl"
}
run sft lora 1e-3 instructions.jsonl --config.finetune.method=lora
run sft qlora 1e-3 instructions.jsonl --config.finetune.method=qlora
run sft full 2e-5 instructions.jsonl --config.finetune.method=full
run dpo dpo_lora 5e-4 pairs.jsonl --config.finetune.method=lora
run reward reward_lora 5e-4 pairs.jsonl --config.finetune.method=lora
