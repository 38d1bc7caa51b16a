#!/usr/bin/env bash
# Runs a command again when it fails, at most RESTARTS times: a training run resumes from its
# newest complete checkpoint each time. Exit 0 (finished) and 2 (a config or usage error, which
# running again cannot mend) end it, as does SIGTERM/SIGINT to the supervisor (passed on to the
# command, which saves and stops). launch.sh --restarts=N runs training under it.
#
#   tpu_setup/supervise.sh RESTARTS COMMAND [ARGS...]     (SUPERVISE_DELAY: seconds, default 10)
set -u
restarts=${1:?usage: supervise.sh RESTARTS COMMAND [ARGS...]}
shift
(( $# )) || { echo "usage: supervise.sh RESTARTS COMMAND [ARGS...]" >&2; exit 2; }
stop=0 child=""
trap 'stop=1; [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null' TERM INT
for ((run = 0; ; run++)); do
  "$@" &
  child=$!
  wait "$child"
  rc=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early
    wait "$child"
    rc=$?
  done
  if (( stop || rc == 0 || rc == 2 || run >= restarts )); then
    exit "$rc"
  fi
  echo "supervise: exit status $rc; restart $((run + 1)) of $restarts in ${SUPERVISE_DELAY:-10} s" >&2
  sleep "${SUPERVISE_DELAY:-10}"
done
