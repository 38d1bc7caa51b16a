#!/usr/bin/env bash
# A training run preempted three times (SIGKILL, SIGTERM, SIGKILL after 30 s each), then
# resumed to its end; prints the goodput breakdown over its four sessions.
# usage: tools/preempted_run.sh WORKDIR [python]
set -u
workdir=${1:?usage: tools/preempted_run.sh WORKDIR [python]}
py=${2:-python}
rm -rf "$workdir"
args=(--config=experiments/tiny.py --config.train.steps=200 --config.train.checkpoint_every=40
      --workdir="$workdir" --noprogress)
for sig in KILL TERM KILL; do
  "$py" -m jaxllm.train "${args[@]}" > /dev/null 2>> "$workdir.log" &
  pid=$!
  sleep 30
  kill -s "$sig" "$pid"
  wait "$pid"
  echo "session ended by SIG$sig: exit $?" >> "$workdir.log"
done
"$py" -m jaxllm.train "${args[@]}" > /dev/null 2>> "$workdir.log"
"$py" -m jaxllm.goodput "$workdir"
