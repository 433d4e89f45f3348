"""A real `mlflow server` on 127.0.0.1 for a test module (tests/test_registry.py, tests/test_secrets.py).

MLflow 3.17's server also starts a job runner (huey, its queue in /dev/shm) for GenAI scoring jobs that pea never
uses; it is switched off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false), as tracking/README.md does for the project's
server. At the end of the module the fixture fails if the server exited early, with the end of its log.

A "connection refused" from a port no server of the module listens on is the process-global tracking URI:
pea.registry sets it (mlflow.set_tracking_uri) to the server of whichever module registered last, and helpers
such as mlflow.artifacts.load_dict resolve `runs:/` through it. Give them the URI (or use an MlflowClient)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def alive(self) -> None:
        """Fail the test with the server's log if the server has exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"the mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Poll `url` until it answers 200; fail the test with the log's tail if `proc` exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:  # URLError is one: not listening yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            exit_code = proc.poll()
            proc.kill()
            pytest.fail(f"{what} did not come up (exit {exit_code}): {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


@contextmanager
def mlflow_server(root: Path):
    port = free_port()
    log_path = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/health", proc, log_path, 90, "mlflow server")
        server = Server(proc, url, log_path)
        try:
            yield server
        finally:
            server.alive()  # a server that died during the module says so, with its log
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
