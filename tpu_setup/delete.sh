#!/usr/bin/env bash
# Deletes the TPU VM (and its queued resource, with --queued).
#
#   tpu_setup/delete.sh --name=my-v5p --zone=us-east5-a [--queued] [--project=P] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
QUEUED=0
for arg in "${EXTRA_ARGS[@]}"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    *) die "unknown flag $arg" ;;
  esac
done
# shellcheck disable=SC2046
if (( QUEUED )); then
  run gcloud compute tpus queued-resources delete "$NAME" $(gcloud_scope) --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" $(gcloud_scope) --quiet
fi
