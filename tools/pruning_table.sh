#!/usr/bin/env bash
# Issue 19's pruning table: SmolLM2-135M-Instruct held-out perplexity, dense vs magnitude /
# Wanda / SparseGPT at 50% unstructured and 2:4, and SparseGPT 2:4 + int4, with the file list
# and eval settings of docs/quantization.md's table. Each pruned checkpoint is deleted after
# its evaluation (540 MB each).
# Usage: bash tools/pruning_table.sh [OUT_DIR]   (~30 min on a 2-core CPU)
set -euo pipefail
OUT=${1:-/tmp/pruning_table}
mkdir -p "$OUT"
MODEL=$(python -m jaxllm.fetch smollm2-135m)
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DATA="$STDLIB/asyncio/taskgroups.py,$STDLIB/ensurepip/__init__.py,$STDLIB/idlelib/colorizer.py,$STDLIB/queue.py,$STDLIB/xml/sax/xmlreader.py"
evaluate() {  # name, checkpoint
  python -m jaxllm.eval --checkpoint="$2" --data="$DATA" --max_seq_len=512 --stride=256 \
    --noprogress | tail -1 | sed "s/^/{\"run\": \"$1\", \"eval\": /; s/$/}/" \
    | tee -a "$OUT/ppl.jsonl"
}
touch "$OUT/ppl.jsonl"
done_already() { grep -q "\"run\": \"$1\", \"eval\"" "$OUT/ppl.jsonl"; }  # a rerun resumes
done_already dense || evaluate dense "$MODEL"
for row in "magnitude 0.5|--method=magnitude --sparsity=0.5" \
           "wanda 0.5|--method=wanda --sparsity=0.5" \
           "sparsegpt 0.5|--method=sparsegpt --sparsity=0.5" \
           "magnitude 2:4|--method=magnitude --pattern=2:4" \
           "wanda 2:4|--method=wanda --pattern=2:4" \
           "sparsegpt 2:4|--method=sparsegpt --pattern=2:4" \
           "sparsegpt 2:4 + int4|--method=sparsegpt --pattern=2:4 --bits=4"; do
  name=${row%%|*}
  flags=${row#*|}
  done_already "$name" && continue
  dir="$OUT/ckpt"
  rm -rf "$dir"
  start=$(date +%s)
  # shellcheck disable=SC2086
  python -m jaxllm.prune --checkpoint="$MODEL" --out="$dir" $flags --progress=false \
    | tail -1 > "$OUT/prune_${name//[ :+]/_}.json"
  echo "{\"run\": \"$name\", \"prune_seconds\": $(( $(date +%s) - start ))}" >> "$OUT/ppl.jsonl"
  evaluate "$name" "$dir"
  rm -rf "$dir"
done
