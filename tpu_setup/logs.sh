#!/usr/bin/env bash
# Collects ~/jaxllm-train.log from every worker into LOCAL_DIR/worker-N.log (or, with --tail=N,
# prints the last N lines of each).
#
#   tpu_setup/logs.sh --name=my-v5p --zone=us-east5-a [--out=tpu-logs] [--tail=50] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
OUT=tpu-logs TAIL=""
for arg in "${EXTRA_ARGS[@]}"; do
  case "$arg" in
    --out=*) OUT="${arg#*=}" ;;
    --tail=*) TAIL="${arg#*=}" ;;
    *) die "unknown flag $arg" ;;
  esac
done
if [[ -n "$TAIL" ]]; then
  on_all_workers "echo == \$(hostname) ==; tail -n $((TAIL)) ~/jaxllm-train.log"
  exit 0
fi
if (( DRY_RUN )); then
  WORKERS=2  # illustrative; a real run asks gcloud how many workers the VM has
else
  WORKERS=$(gcloud compute tpus tpu-vm describe "$NAME" $(gcloud_scope) \
            --format='value(networkEndpoints.len())')
fi
run mkdir -p "$OUT"
for ((i = 0; i < WORKERS; i++)); do
  # shellcheck disable=SC2046
  run gcloud compute tpus tpu-vm scp "$NAME":jaxllm-train.log "$OUT/worker-$i.log" \
      $(gcloud_scope) --worker="$i"
done
