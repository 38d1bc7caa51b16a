#!/usr/bin/env bash
# Copies this checkout to every worker and installs it with the TPU extra (jax[tpu], libtpu).
#
#   tpu_setup/install.sh --name=my-v5p --zone=us-east5-a [--project=P] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
(( ${#EXTRA_ARGS[@]} == 0 )) || die "unknown flag ${EXTRA_ARGS[0]}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE=/tmp/jaxllm-src.tar.gz
run tar -czf "$ARCHIVE" -C "$REPO" --exclude=.git --exclude=runs --exclude=.ci-venv .
# shellcheck disable=SC2046
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":jaxllm-src.tar.gz $(gcloud_scope) --worker=all
on_all_workers "mkdir -p ~/jaxllm && tar -xzf ~/jaxllm-src.tar.gz -C ~/jaxllm && \
python3 -m pip install --upgrade pip && python3 -m pip install -e ~/jaxllm'[tpu]'"
