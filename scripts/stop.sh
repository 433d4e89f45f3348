#!/bin/sh
# Stop what scripts/serve.sh started: the worker first (a worker whose server is gone hangs), then the
# server. Flow runs the worker started (its child processes) get SIGTERM first: Prefect marks them
# Crashed, and `prefect flow-run retry <id>` resumes them later from the cache and the last checkpoint.
# The server gets SIGTERM and up to 30 s. A Prefect 3.9 worker stops taking runs on the first SIGTERM
# but was seen not to exit on it (nor on SIGINT) even when idle; on a second SIGTERM it kills itself,
# so the worker gets SIGTERM, 10 s, then SIGTERM again. Anything still alive 5 s later gets SIGKILL.
# Same PEA_SERVE_DIR as serve.sh.
# Usage: scripts/stop.sh [worker] [server]   (default: both, worker first)
set -eu
cd "$(dirname "$0")/.."
run=${PEA_SERVE_DIR:-$PWD/.cache/serve}
wait_gone() {  # pid, half-seconds
  i=0
  while kill -0 "$1" 2>/dev/null && [ $i -lt "$2" ]; do sleep 0.5; i=$((i + 1)); done
  ! kill -0 "$1" 2>/dev/null
}
stop() {
  pidfile="$run/$1.pid"
  [ -f "$pidfile" ] || { echo "$1: not running"; return 0; }
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    [ "$1" = worker ] && for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
      echo "$1: stopping its flow run process $child"
      kill -TERM "$child" 2>/dev/null || true
    done
    kill -TERM "$pid"
    wait_gone "$pid" "$([ "$1" = worker ] && echo 20 || echo 60)" && { echo "$1: stopped (pid $pid)"; rm -f "$pidfile"; return 0; }
    if [ "$1" = worker ]; then
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 && { echo "$1: stopped on the second SIGTERM (pid $pid)"; rm -f "$pidfile"; return 0; }
    fi
    kill -KILL "$pid" 2>/dev/null || true
    echo "$1: killed (pid $pid)"
  else
    echo "$1: not running (stale pid $pid)"
  fi
  rm -f "$pidfile"
}
[ $# -gt 0 ] || set -- worker server
for what in "$@"; do
  case $what in
    worker|server) stop "$what" ;;
    *) echo "usage: $0 [worker] [server]" >&2; exit 2 ;;
  esac
done
