#!/usr/bin/env bash
# Creates a TPU VM (or, with --queued, a queued resource that waits for capacity).
#
#   tpu_setup/create.sh --name=my-v5p --zone=us-east5-a --accelerator-type=v5p-64 \
#       [--version=v2-alpha-tpuv5] [--queued] [--spot] [--project=P] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
TYPE="" VERSION="" QUEUED=0 SPOT=0
for arg in "${EXTRA_ARGS[@]}"; do
  case "$arg" in
    --accelerator-type=*) TYPE="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    *) die "unknown flag $arg" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--accelerator-type=TYPE is required (e.g. v5p-64, v6e-256, v4-8)"
if [[ -z "$VERSION" ]]; then  # the runtime image that matches the chip generation
  case "$TYPE" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
# shellcheck disable=SC2046
if (( QUEUED )); then
  args=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" $(gcloud_scope)
        --accelerator-type="$TYPE" --runtime-version="$VERSION")
  (( SPOT )) && args+=(--spot)
  run "${args[@]}"
  echo "# wait until ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
else
  args=(gcloud compute tpus tpu-vm create "$NAME" $(gcloud_scope)
        --accelerator-type="$TYPE" --version="$VERSION")
  (( SPOT )) && args+=(--spot)
  run "${args[@]}"
fi
