#!/bin/sh
# Serve PEA's deployments on this machine, in the background: a Prefect server on 127.0.0.1, the process
# work pool `pea-local`, every deployment of prefect.yaml (`prefect --no-prompt deploy --all`) and a
# worker. Idempotent: what already runs is left alone. Stop everything with scripts/stop.sh.
#   PEA_PORT        server port (default 4200)
#   PEA_SERVE_DIR   pid and log files (default .cache/serve); PREFECT_HOME is Prefect's own (database)
# PEA_LAKE, MLFLOW_TRACKING_URI and the like are passed on to every flow run through the worker.
set -eu
cd "$(dirname "$0")/.."
. scripts/offline-env.sh
port=${PEA_PORT:-4200}
run=${PEA_SERVE_DIR:-$PWD/.cache/serve}
mkdir -p "$run"
export PREFECT_API_URL="http://127.0.0.1:$port/api"
prefect=$PWD/.venv/bin/prefect
alive() { [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

if alive server; then
  echo "server: already running (pid $(cat "$run/server.pid"))"
else
  "$prefect" server start --host 127.0.0.1 --port "$port" > "$run/server.log" 2>&1 &
  echo $! > "$run/server.pid"
  echo "server: starting on http://127.0.0.1:$port (pid $!, log $run/server.log)"
fi
if ! "$prefect" server status --wait --timeout 90 > /dev/null 2>&1; then
  echo "server did not become healthy within 90 s; see $run/server.log" >&2
  tail -20 "$run/server.log" >&2
  exit 1
fi

if "$prefect" work-pool inspect pea-local > /dev/null 2>&1; then
  echo "pool: pea-local exists"
else
  "$prefect" work-pool create pea-local --type process > /dev/null
  echo "pool: created pea-local (process)"
fi

"$prefect" --no-prompt deploy --all

if alive worker; then
  echo "worker: already running (pid $(cat "$run/worker.pid"))"
else
  "$prefect" worker start --pool pea-local --type process > "$run/worker.log" 2>&1 &
  echo $! > "$run/worker.pid"
  echo "worker: started (pid $!, log $run/worker.log)"
fi
echo "UI: http://127.0.0.1:$port   run: PREFECT_API_URL=$PREFECT_API_URL $prefect deployment run pea/train-language -p language=zh --watch"
