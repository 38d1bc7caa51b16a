#!/usr/bin/env bash
# A newcomer's first commands on a fresh clone of this repository, timed (wall seconds each):
# clone, venv, `pip install -e .`, the default training run, the README's generate command and
# `jaxllm train --show_config`. Usage: bash tools/first_hour.sh [OUT] (default /tmp/first-hour);
# PYTHON picks the interpreter (default python3.12). Outputs and times.txt land in OUT.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/first-hour}
PYTHON=${PYTHON:-python3.12}
CLONE="$OUT/clone"
rm -rf "$OUT"
mkdir -p "$OUT"
timed() {
  local name=$1
  shift
  local start end rc
  start=$(date +%s.%N)
  "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  end=$(date +%s.%N)
  printf "%-12s rc=%d %7.1f s\n" "$name" "$rc" "$(echo "$end - $start" | bc)" | tee -a "$OUT/times.txt"
}
timed clone git clone -q "$REPO" "$CLONE"
cd "$CLONE" || exit 1
timed venv "$PYTHON" -m venv .venv
timed install .venv/bin/pip install -q -e .
timed train .venv/bin/python -m jaxllm.train --noprogress
timed generate .venv/bin/python -m jaxllm.generate --checkpoint=runs/tiny \
  --prompt='def fibonacci(n):' --max_tokens=64
timed show_config .venv/bin/jaxllm train --show_config
