#!/usr/bin/env bash
# Issue 19's distillation comparison: one small student trained for equal steps on the same
# data (the raw standard library of tools/curation_experiment.sh, its held-out files kept out)
# on hard labels only, and by distillation from the tiny experiment's model trained there
# (alpha 0.5, temperature 2), both with the teacher's tokenizer; held-out loss of each.
# Usage: bash tools/distill_experiment.sh CURATION_OUT [STEPS]   (after curation_experiment.sh)
set -euo pipefail
EXP=$1
STEPS=${2:-300}
TEACHER="$EXP/w_raw"
common=(--config.train.steps="$STEPS" --config.train.eval_every="$STEPS"
        --config.train.checkpoint_every="$STEPS" --config.train.eval_batches=16
        --config.data.paths="$EXP/raw" --config.data.eval_paths="$EXP/heldout"
        --config.model.d_model=128 --config.model.n_layers=2 --config.model.n_heads=2
        --config.model.n_kv_heads=1 --config.model.head_dim=64 --config.model.d_ff=384
        --progress=false)
: > "$EXP/distill_eval.jsonl"
evaluate() {
  python -m jaxllm.eval --checkpoint="$2" --data="$EXP/heldout" --max_seq_len=256 --batch_size=8 \
    --noprogress | tail -1 | sed "s/^/{\"run\": \"$1\", \"eval\": /; s/$/}/" \
    | tee -a "$EXP/distill_eval.jsonl"
}
evaluate teacher "$TEACHER"
[ -e "$EXP/w_student_hard/checkpoints/$STEPS" ] || python -m jaxllm.train "${common[@]}" \
  --config.data.tokenizer="$TEACHER/tokenizer.model" --workdir="$EXP/w_student_hard" \
  > "$EXP/student_hard.log" 2>&1
evaluate student_hard "$EXP/w_student_hard"
[ -e "$EXP/w_student_kd/checkpoints/$STEPS" ] || python -m jaxllm.distill "${common[@]}" \
  --teacher="$TEACHER" --config.distill.alpha=0.5 --config.distill.temperature=2.0 \
  --workdir="$EXP/w_student_kd" > "$EXP/student_kd.log" 2>&1
evaluate student_kd "$EXP/w_student_kd"
