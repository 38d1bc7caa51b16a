#!/usr/bin/env bash
# Issue 20's training comparison: the tiny experiment trained for equal steps on the raw
# standard library, on it deduplicated, and on it deduplicated + Gopher-filtered, all evaluated
# on the same held-out files (the stdlib's 5% hash split, kept out of every training set) with
# one tokenizer (the raw run's); then the padding of each packing mode.
# Usage: bash tools/curation_experiment.sh [OUT_DIR] [STEPS]   (~25 min on a 2-core CPU)
set -euo pipefail
OUT=${1:-/tmp/curation_experiment}
STEPS=${2:-300}
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import os, sys, sysconfig
from jaxllm.data import corpus
out = sys.argv[1]
root = sysconfig.get_paths()["stdlib"]
split = corpus.build_corpus((), 0.05)
for name, docs in (("raw", split.train), ("heldout", split.eval)):
  for path in sorted({d.path for d in docs}):
    link = os.path.join(out, name, os.path.relpath(path, root))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.lexists(link):
      os.symlink(path, link)
  print(name, len({d.path for d in docs}), "files")
PY
python -m jaxllm.data prepare --data="$OUT/raw" --out="$OUT/dedup" --filters=none \
  --progress=false --overwrite | tee "$OUT/prepare_dedup.json"
python -m jaxllm.data prepare --data="$OUT/raw" --out="$OUT/curated" --progress=false \
  --overwrite | tee "$OUT/prepare_curated.json"
common=(--config.train.steps="$STEPS" --config.train.eval_every="$STEPS"
        --config.train.checkpoint_every="$STEPS" --config.train.eval_batches=16
        --config.data.eval_paths="$OUT/heldout")
run() {  # name, data flags...
  local name=$1; shift
  [ -e "$OUT/w_$name/checkpoints/$STEPS" ] || python -m jaxllm.train "${common[@]}" "$@" \
    --workdir="$OUT/w_$name" 2> "$OUT/train_$name.log"
  python -m jaxllm.eval --checkpoint="$OUT/w_$name" --data="$OUT/heldout" --max_seq_len=256 \
    --batch_size=8 --noprogress | tail -1 | sed "s/^/{\"run\": \"$name\", \"eval\": /; s/$/}/" \
    | tee -a "$OUT/heldout_eval.jsonl"
}
: > "$OUT/heldout_eval.jsonl"
run raw --config.data.paths="$OUT/raw"
tok="--config.data.tokenizer=$OUT/w_raw/tokenizer.model"
run dedup --config.data.paths="$OUT/dedup/*.jsonl" "$tok"
run curated --config.data.paths="$OUT/curated/*.jsonl" "$tok"
python -m jaxllm.data packing --data="$OUT/raw" --tokenizer="$OUT/w_raw/tokenizer.model" \
  --seq_len=256,1024 --packing_bins=64 | tee "$OUT/packing.jsonl"
