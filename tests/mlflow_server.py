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
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
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
