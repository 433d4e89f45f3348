#!/bin/sh
# Create .venv and install pea with its tested dependencies. Idempotent: skips when pyproject.toml
# is unchanged since the last install. pip, not uv/poetry: only pip finds the local CPU torch wheel.
set -eu
cd "$(dirname "$0")/.."
want=$(sha256sum pyproject.toml | cut -c1-16)
stamp=.venv/.pea-installed
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), "pea needs Python 3.11, found " + sys.version'
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
# img2dataset pulls in the Python-2-era `dataclasses` backport, which breaks Prefect's server.
.venv/bin/pip uninstall -y -q dataclasses 2>/dev/null || true
echo "$want" > "$stamp"
