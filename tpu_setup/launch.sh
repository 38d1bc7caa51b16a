#!/usr/bin/env bash
# Starts one training process per worker (jax.distributed discovers the pod by itself), logging
# to ~/jaxllm-train.log on each worker. WORKDIR must be a path every worker sees (a Filestore or
# gcsfuse mount): checkpoints are written collectively into it.
#
#   tpu_setup/launch.sh --name=my-v5p --zone=us-east5-a \
#       --config=experiments/llama3_8b.py:v5p-64 --workdir=/mnt/shared/runs/llama3_8b \
#       [--config.train.steps=1000 ...] [--restarts=N] [--project=P] [--dry-run]
#
# --restarts=N runs each worker's process under tpu_setup/supervise.sh, which starts it again
# (resuming from the newest checkpoint) when it fails, at most N times; pair it with
# --config.train.watchdog_s=SECONDS --config.train.watchdog_exit=true so that the processes
# left hanging in a collective by a failed peer exit too.
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
CONFIG="" WORKDIR="" RESTARTS=0 OVERRIDES=()
for arg in "${EXTRA_ARGS[@]}"; do
  case "$arg" in
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --restarts=*) RESTARTS="${arg#*=}" ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    *) die "unknown flag $arg" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config=EXPERIMENT is required"
[[ -n "$WORKDIR" ]] || die "--workdir=SHARED_DIR is required"
[[ "$RESTARTS" =~ ^[0-9]+$ ]] || die "--restarts=$RESTARTS is not a count"
SUPERVISOR=""
(( RESTARTS > 0 )) && SUPERVISOR="bash tpu_setup/supervise.sh $RESTARTS "
CMD="cd ~/jaxllm && nohup ${SUPERVISOR}python3 -m jaxllm.train --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR")"
for o in "${OVERRIDES[@]}"; do CMD+=" $(printf '%q' "$o")"; done
CMD+=" > ~/jaxllm-train.log 2>&1 &"
on_all_workers "$CMD"
