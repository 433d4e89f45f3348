"""No secret reaches what a user reads: every `pea` command and the flow's failure path run as real subprocesses with a
password-bearing tracking URI on a closed loopback port, MLFLOW_TRACKING_TOKEN, HF_TOKEN and a signed manifest URL
(in the spec), and neither their output nor any file they leave (logs, reports, Prefect's database) holds a secret.
A failing command prints one line naming the fix, no traceback."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSWORD, TOKEN, HF_TOKEN = "pw-Tr4ck1ng-9f2c", "mlflow-tok-7d1e5b", "hf_SeCrEtHf123456"
SIGNATURES = {"X-Amz-Credential": "AKIAc4e1d2f3", "X-Amz-Signature": "amzsig-81a9f0", "Signature": "azsig-0b7e33",
              "sig": "sasig-5a5a5a", "token": "qtoken-9e9e9e", "access_token": "acc-tok-1f1f1f",
              "X-Goog-Signature": "googsig-3c3c3c"}
SECRETS = [PASSWORD, TOKEN, HF_TOKEN, *SIGNATURES.values()]
# 127.0.0.2: outside the embedded profile's corpus.allow_networks, so acquire refuses it before any connection.
SIGNED = "http://127.0.0.2:9/zh.parquet?" + "&".join(f"{k}={v}" for k, v in SIGNATURES.items())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A project home whose `leaky` profile names the signed manifest, a lake, and the secret-laden environment."""
    root = tmp_path_factory.mktemp("secrets")
    home = root / "home"
    (home / "data").mkdir(parents=True)
    for name in ("languages", "prompts", "toy"):
        (home / "data" / name).symlink_to(ROOT / "data" / name)
    shutil.copytree(ROOT / "data" / "profiles", home / "data" / "profiles")
    (home / "data" / "profiles" / "leaky.yaml").write_text(
        f'corpus:\n  synthetic: null\n  manifests: [{{path: "{SIGNED}"}}]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_", "PREFECT_API"))}
    env.update(PEA_HOME=str(home), PEA_LAKE=str(root / "lake"), PREFECT_HOME=str(root / "prefect"),
               PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"http://alice:{PASSWORD}@127.0.0.1:{_closed_port()}",
               MLFLOW_TRACKING_TOKEN=TOKEN, HF_TOKEN=HF_TOKEN, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="5", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    (root / "pairs.parquet").write_bytes(b"PAR1")  # eval checks only that the file is there before asking MLflow
    return {"root": root, "env": env, "pairs": root / "pairs.parquet"}


def _run(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=world["env"], cwd=world["root"], capture_output=True, text=True,
                          timeout=600)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def _files_leaking(root: Path) -> list[str]:
    """Every file under `root` (logs, reports, results, Prefect's SQLite database) that holds a secret's bytes."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {s}" for s in SECRETS if s.encode() in data]
    return found


@pytest.mark.parametrize("command, fix", [
    (["validate", "zh", "--profile", "embedded,leaky"], None),
    (["zoo"], None),
    (["eval", "--language", "zh", "--profile", "embedded,leaky", "--pairs", "PAIRS"], "MLFLOW_TRACKING_URI"),
    (["generate", "--language", "zh", "--profile", "embedded,leaky", "--prompt", "红色的圆形"], "MLFLOW_TRACKING_URI"),
])
def test_every_command_prints_no_secret_and_fails_in_one_line_naming_the_fix(world, command, fix):
    args = [str(world["pairs"]) if a == "PAIRS" else a for a in command]
    done = _run(world, "-m", "pea.cli", *args)
    output = done.stdout + done.stderr
    assert not _leaks(output), output
    if fix is None:
        assert done.returncode == 0, output
        return
    assert done.returncode == 1 and "Traceback" not in output, output
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pea {command[0]}: ") and fix in last and "alice:***@127.0.0.1" in last, last


def test_the_flow_failure_path_logs_and_stores_no_secret(world):
    done = _run(world, "-m", "flows.pea_flow", "--language", "zh", "--profile", "embedded,leaky")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    # The failure happened where the signed URL is quoted, and was logged (Prefect) and printed masked.
    assert "X-Amz-Signature=***" in output and "refused to connect to 127.0.0.2" in output, output[-3000:]
    # One line says why (Prefect's own shutdown note may follow it).
    assert [line for line in done.stderr.splitlines()
            if line.startswith("pea flow: PermissionError: manifest http://127.0.0.2:9/zh.parquet?X-Amz-Credential=***")]
    assert not _leaks(output), _leaks(output)
    written = [p for p in world["root"].iterdir() if p.name != "home"]  # home holds the spec: the secret's source
    assert {"lake", "prefect"} <= {p.name for p in written}
    assert not [leak for folder in written if folder.is_dir() for leak in _files_leaking(folder)]
