"""`mlflow models serve` of a registered champion answers a real HTTP POST /invocations with the conditioning the
pyfunc gives in-process. The registry is a SQLite store (the embedded default's kind): the serve process reads the
same file, so no tracking server is needed. The session's trained adapter (conftest.trained_sd15) is registered once,
after a short evaluation; nothing is trained here."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import evaluated_variant
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow_server import free_port, wait_until_up

from pea import registry
from pea.method.adapter import PEAAdapter

PROMPTS = ["左边有一个红色的圆形", "右边有两个蓝色的正方形"]
CHAMPION = "models:/pea-adapter-zh@champion"


@pytest.fixture(scope="module")
def registered(trained_sd15, tmp_path_factory):
    """The embedded default's trained adapter as `pea-adapter-zh` version 1 (champion) in a fresh SQLite store;
    yields the store's URI. Evaluated on the held-out pairs alone, one grid row: every figure registration needs,
    in seconds (serving reads none of them)."""
    root = tmp_path_factory.mktemp("serve-registry")
    uri = f"sqlite:///{root}/mlflow.db"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = trained_sd15.spec
    spec = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"prompt_sets": [],
                                                                                 "grid_prompts": 1})})
    adapter = PEAAdapter.from_pretrained(trained_sd15.adapter_dir).eval()
    try:
        spec, result, evaluation = evaluated_variant(trained_sd15, "served", adapter, root, spec)
        reg = registry.register(spec, result, evaluation, [], trained_sd15.pairs)
        assert reg.champion and reg.champion_uri == CHAMPION
        yield uri
    finally:
        mlflow.set_tracking_uri(None)  # register sets the process-global URI; later modules must not inherit it
        patch.undo()


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(body, ensure_ascii=False).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def test_the_served_champion_answers_invocations_as_the_pyfunc_does(registered, tmp_path):
    expected = mlflow.pyfunc.load_model(CHAMPION).predict(PROMPTS)["prompt_embeds"]
    port, venv_bin = free_port(), Path(sys.executable).parent
    # The serve process starts `uvicorn` by name: the venv's bin first on PATH. Its own session, so that the whole
    # group (mlflow's CLI and the uvicorn it starts) is ended together.
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(venv_bin / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager",
                                   "local", "-h", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  cwd=tmp_path, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/ping", server, log, 120, "mlflow models serve")
        started = time.monotonic()
        for body in ({"inputs": PROMPTS}, {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}}):
            served = np.asarray(_post(f"{base}/invocations", body)["predictions"]["prompt_embeds"], np.float32)
            assert served.shape == expected.shape and served.shape[0] == len(PROMPTS), (served.shape, expected.shape)
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
        print(f"served: {expected.shape} per request, {time.monotonic() - started:.2f} s for both")
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:  # already gone
            server.wait()


def test_predict_is_typed_and_the_explicit_signature_stands(tmp_path):
    """MLflow 3 warns about a predict without type hints, and replaces an explicit signature with one inferred from
    hints it can read (`list[str]` would give outputs `Any`): pea's `pd.DataFrame` hint does neither."""
    signature = ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4, 8), "prompt_embeds")]))
    (tmp_path / "adapter").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.save_model(tmp_path / "model", python_model=str(registry.SERVING_MODEL),
                                 artifacts={"adapter": str(tmp_path / "adapter")}, signature=signature,
                                 pip_requirements=registry.PIP_REQUIREMENTS)
    assert not [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert Model.load(tmp_path / "model").signature == signature
