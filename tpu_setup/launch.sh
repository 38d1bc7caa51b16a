#!/usr/bin/env bash
# Starts one training process per worker (jax.distributed discovers the pod by itself), logging
# to ~/jaxllm-train.log on each worker. WORKDIR must be a path every worker sees (a Filestore or
# gcsfuse mount): checkpoints are written collectively into it.
#
#   tpu_setup/launch.sh --name=my-v5p --zone=us-east5-a \
#       --config=experiments/llama3_8b.py:v5p-64 --workdir=/mnt/shared/runs/llama3_8b \
#       [--config.train.steps=1000 ...] [--project=P] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
CONFIG="" WORKDIR="" OVERRIDES=()
for arg in "${EXTRA_ARGS[@]}"; do
  case "$arg" in
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    *) die "unknown flag $arg" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config=EXPERIMENT is required"
[[ -n "$WORKDIR" ]] || die "--workdir=SHARED_DIR is required"
CMD="cd ~/jaxllm && nohup python3 -m jaxllm.train --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR")"
for o in "${OVERRIDES[@]}"; do CMD+=" $(printf '%q' "$o")"; done
CMD+=" > ~/jaxllm-train.log 2>&1 &"
on_all_workers "$CMD"
