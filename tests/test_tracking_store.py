"""A new SQLite tracking store appears whole (pea.registry.registration.create_sqlite_store): a kill while MLflow builds its
schema leaves nothing a rerun trips over (benchmarks/chaos.py's kill:register once landed there and the rerun
failed with "table review_queues already exists")."""

import os
import signal
import subprocess
import sys
import time

from mlflow import MlflowClient

from pea.io.atomic import TEMP_MARK
from pea.registry import tracking_uri

CREATE = "from pea.registry import tracking_uri; tracking_uri()"


def test_a_kill_while_the_schema_is_built_leaves_no_store_and_the_rerun_makes_a_whole_one(tmp_path, monkeypatch):
    db = tmp_path / "tracking" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    child = subprocess.Popen([sys.executable, "-c", CREATE], env=env)
    deadline = time.monotonic() + 120
    while not list(db.parent.glob(f".*{TEMP_MARK}")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the child finished before its schema was half built; rerun"
    assert not db.exists()  # killed mid-migration: the name is not taken by a half store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    client = MlflowClient(tracking_uri())
    experiment_id = client.create_experiment("pea-zh")
    assert client.get_experiment(experiment_id).name == "pea-zh"


def test_two_processes_creating_the_store_at_once_share_one(tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    children = [subprocess.Popen([sys.executable, "-c", "from mlflow import MlflowClient; from pea.registry import "
                                  f"tracking_uri; MlflowClient(tracking_uri()).create_experiment('e{i}')"], env=env)
                for i in range(2)]
    assert [c.wait(timeout=300) for c in children] == [0, 0]
    names = {e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()}
    assert {"e0", "e1"} <= names  # neither process's experiment was lost to the other's store
