# Shared by the tpu_setup scripts: flag parsing and a dry-run-aware runner. Source, don't run.
#
# Flags (every script): --name=NAME (required) --zone=ZONE (required) [--project=PROJECT]
#   [--dry-run]   print the gcloud commands instead of running them
# Script-specific flags are listed in each script's header.

set -euo pipefail

NAME="" ZONE="" PROJECT="" DRY_RUN=0
EXTRA_ARGS=()

parse_common_flags() {
  for arg in "$@"; do
    case "$arg" in
      --name=*) NAME="${arg#*=}" ;;
      --zone=*) ZONE="${arg#*=}" ;;
      --project=*) PROJECT="${arg#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      *) EXTRA_ARGS+=("$arg") ;;
    esac
  done
  [[ -n "$NAME" ]] || die "--name=NAME is required"
  [[ -n "$ZONE" ]] || die "--zone=ZONE is required"
}

die() { echo "error: $*" >&2; exit 2; }

# The flags gcloud needs on every call.
gcloud_scope() {
  local scope=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && scope+=(--project="$PROJECT")
  echo "${scope[@]}"
}

# run CMD...: prints the command (shell-quoted) under --dry-run, otherwise runs it.
run() {
  if (( DRY_RUN )); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# on_all_workers COMMAND: runs a shell command on every worker of the TPU VM.
on_all_workers() {
  # shellcheck disable=SC2046
  run gcloud compute tpus tpu-vm ssh "$NAME" $(gcloud_scope) --worker=all --command="$1"
}
