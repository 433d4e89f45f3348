"""Runs of one language never overlap, and a run killed with -9 does not block the next one for good.

Without a Prefect server (the embedded default: a temporary server per process, which runs no lease revoker), the
flow holds a lock on a file in the lake; a Prefect concurrency slot taken there would stay taken after a kill -9.
With a server, tests/test_deploy.py covers the server's limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from flows.pea_flow import one_run_of

ROOT = Path(__file__).resolve().parents[1]


def _holder(lake: Path) -> subprocess.Popen:
    code = ("import sys; from pathlib import Path; from flows.pea_flow import one_run_of\n"
            "with one_run_of('zh', Path(sys.argv[1])):\n print('held', flush=True); sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    holder = subprocess.Popen([sys.executable, "-c", code, str(lake)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = [holder.stdout.readline().strip() for _ in range(2)]  # its "waiting for …" line, then ours
    assert lines[0].startswith("waiting for any other run of zh") and lines[1] == "held", lines
    return holder


def test_a_run_killed_with_9_does_not_hold_its_language(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    holder = _holder(tmp_path)
    try:
        with pytest.raises(Timeout):  # a live run of zh holds it: another waits
            with FileLock(tmp_path / "zh" / ".run.lock", timeout=1):
                pass
        with one_run_of("ja", tmp_path):  # other languages do not wait
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FileLock(tmp_path / "zh" / ".run.lock", timeout=5):  # released with the killed process, at once
        pass
    with one_run_of("zh", tmp_path):
        pass
    assert f"waiting for any other run of zh to finish (lock {tmp_path / 'zh' / '.run.lock'})" in capsys.readouterr().out
