"""Credentials never reach what people read: the launcher's streamed DeepSpeed output (DeepSpeed's real multi-node
runner, which echoes its command with every exported variable), MLflow params/tags/spec.json on a real server
reached through a URI with a password, the flow's `model-<lang>` Prefect artifact and the printed summary."""

import json
import os
import stat
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import free_port, mlflow_server

from pea import registry
from pea.embed import launcher
from pea.spec import LauncherSpec, ManifestSpec, load_spec

SECRET = "SeCrEt-9f2c"
SIGNED = f"https://bucket.s3.amazonaws.com/zh.parquet?X-Amz-Credential=AKIA{SECRET}&X-Amz-Signature={SECRET}&v=1"


def test_deepspeed_multinode_runner_echo_is_masked_in_the_stream_and_the_error(tmp_path, monkeypatch, capsys):
    # pdsh itself cannot run here (no nodes): a stand-in prints the command it was given, as a remote shell's error
    # would, and fails. DeepSpeed's runner, which logs `cmd = pdsh ... export MLFLOW_TRACKING_TOKEN=...`, is real.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # It also keeps what the launch's .deepspeed_env held, and its mode, while the launch runs (pdsh runs in it).
    (bin_dir / "pdsh").write_text("#!/bin/sh\ncp .deepspeed_env ../env-seen; stat -c %a .deepspeed_env > ../env-mode\n"
                                  "echo \"pdsh: cannot reach nodes for: $*\"\nexit 3\n")
    (bin_dir / "pdsh").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", f"tok-{SECRET}")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", f"pw-{SECRET}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@mlflow.example.org")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    layout = LauncherSpec(num_gpus=1, num_nodes=2, hostfile=str(hostfile), master_addr="127.0.0.1",
                          master_port=29511)
    command = launcher.deepspeed_command(layout, "pea.train", "train.launcher")
    command.insert(1, "--no_ssh_check")  # ssh to node-0 would fail first; the echo comes after this check
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(launcher.LaunchError) as raised:
        launcher.run(command, layout, workdir)
    out = capsys.readouterr().out
    assert "export MLFLOW_TRACKING_TOKEN=***;" in out and "pdsh: cannot reach nodes" in out  # the echo happened
    assert "MLFLOW_TRACKING_PASSWORD=***" in out and "alice:***@mlflow.example.org" in out
    assert SECRET not in out and SECRET not in str(raised.value) and "MLFLOW_TRACKING_TOKEN=***" in str(raised.value)
    # The nodes got the real values, from the owner-only file DeepSpeed exports, which is gone once the launch ended
    # (here in failure; tests/test_launcher_env.py: in success).
    assert f"MLFLOW_TRACKING_TOKEN=tok-{SECRET}" in (tmp_path / "env-seen").read_text()
    assert (tmp_path / "env-mode").read_text().strip() == "600" and not (workdir / ".deepspeed_env").exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, reached through a URI with a password (sent, and ignored: no auth)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-secrets")) as running:
        yield running.url.replace("http://", f"http://alice:{SECRET}@")


def test_mlflow_params_tags_and_spec_json_hold_no_signature(server, zoo_dir, monkeypatch, tmp_path):
    # MLflow's telemetry thread sets and unsets _MLFLOW_TELEMETRY_SESSION_ID in os.environ, racing monkeypatch's
    # restore (a KeyError, seen twice); this test is about params and tags, not telemetry.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    spec = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    spec = spec.model_copy(update={"corpus": spec.corpus.model_copy(update={
        "synthetic": None, "manifests": [ManifestSpec(path=SIGNED)]})})
    client = MlflowClient(server)
    experiment = client.create_experiment("secrets")
    run_id = client.create_run(experiment).info.run_id
    registry.log_spec(client, run_id, spec, {"teacher_id": spec.teacher.id, "source": SIGNED})
    client.set_terminated(run_id)
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert "X-Amz-Signature=***" in params["corpus.manifests"] and "X-Amz-Credential=***" in params["corpus.manifests"]
    assert tags["pea.teacher_id"] == spec.teacher.id and tags["pea.source"].endswith("X-Amz-Signature=***&v=1")
    # Through this client, not mlflow.artifacts.load_dict: that resolves runs:/ with the process-global tracking URI,
    # which an earlier module's register() set to its own (by now stopped) server.
    logged = json.loads(Path(client.download_artifacts(run_id, "spec.json", str(tmp_path))).read_text())
    assert logged["corpus"]["manifests"][0]["path"].endswith("X-Amz-Signature=***&v=1")
    assert not [v for v in [*params.values(), *tags.values()] if SECRET in v] and SECRET not in str(logged)


def test_the_model_artifact_and_the_printed_summary_mask_the_tracking_password(server, capsys):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.pea_flow import print_summary, publish_model

    registered = registry.Registration(server, "pea-zh", "0" * 32, "pea-adapter-zh", "3", True)

    @flow
    def publish() -> dict:
        return publish_model("zh", registered, ["acquire"])

    with prefect_test_harness(server_startup_timeout=180):  # slow to start on busy shared cores
        model = publish()
        with get_client(sync_client=True) as client:
            markdown = next(a for a in client.read_artifacts() if a.key == "model-zh").data
    assert "alice:***@127.0.0.1" in markdown and "models:/pea-adapter-zh/3" in markdown and SECRET not in markdown
    assert model["tracking_uri"].startswith("http://alice:***@") and SECRET not in str(model)
    print_summary({"language": "zh", "acquired": {"downloaded": 1, "rows": 1, "shards_skipped": 0, "shards": 1,
                                                  "seconds": 0.1},
                   "filtered": {"rows_in": 1, "rows_out": 1, "dropped": {}},
                   "embedded": {"computed": {}, "reused": {}, "seconds": 0.0},
                   "trained": {"steps": 1, "final_loss": 0.1, "samples_per_s": 1.0},
                   "evaluation": {"heldout_pairs": 1, "rel_error_trained": 0.1, "rel_error_untrained": 0.2,
                                  "improvement": 0.5},
                   "grid": "grid.png", "model": {**model, "tracking_uri": server}})  # even an unmasked one
    out = capsys.readouterr().out
    assert "alice:***@127.0.0.1" in out and SECRET not in out


def test_an_unreachable_tracking_server_fails_without_quoting_its_password(zoo_dir, monkeypatch):
    from mlflow.exceptions import MlflowException

    from pea import ops

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    registered = registry.Registration(uri, "pea-zh", "0" * 32, "pea-adapter-zh", "1", True)
    with pytest.raises(MlflowException) as raised:  # MLflow's own message quotes the request URL
        ops.tag_sources(registered, load_spec("zh", "embedded", zoo_dir=zoo_dir))
    assert "alice:***@127.0.0.1" in str(raised.value) and SECRET not in str(raised.value)
    assert SECRET not in raised.value.message
