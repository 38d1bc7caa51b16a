#!/usr/bin/env bash
# Resident memory of `python -m jaxllm.serve` on SmolLM2-135M after one request, with the
# default KV pool and with the flags given ("--num_pages=4096" is the old default: 8 slots x
# 8192 tokens). Usage: bash tools/serve_rss.sh [PYTHON] [extra serve flags...]
set -euo pipefail
PY=${1:-python}; shift || true
CKPT=$($PY -m jaxllm.fetch smollm2-135m)
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$PY -m jaxllm.serve --checkpoint="$CKPT" --port="$PORT" "$@" 2> /tmp/serve_rss.log &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $PID 2>/dev/null || { cat /tmp/serve_rss.log; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "def fibonacci(n):", "max_tokens": 16}' > /dev/null
grep -E "^(VmRSS|VmHWM)" /proc/$PID/status | tr -s ' ' | tr '\n' ' '
grep "^serving" /tmp/serve_rss.log
