#!/bin/sh
# The embedded default: the `pea` flow in-process for one language (default zh), tiny offline models
# (the trained toy teacher of data/toy/, docs/results.md), the synthetic corpus on 127.0.0.1, MLflow on
# SQLite under tracking/. Usage: scripts/run-embedded.sh [lang]
set -eu
cd "$(dirname "$0")/.."
. scripts/offline-env.sh
exec .venv/bin/python -m flows.pea_flow --language "${1:-zh}" --profile embedded,toy
