"""MLflow: log a training run, register its adapter as `pea-adapter-<lang>`, move the aliases.

    register(spec, trained, evaluation, artifacts, lineage) -> Registration

The embedded default keeps MLflow under `tracking/` (SQLite + local artifacts); set
MLFLOW_TRACKING_URI to use a team server instead (see tracking/README.md). The new version always
becomes `challenger`; `champion` moves to it only when its evaluation beats the untrained adapter.
Aliases are set only once the version is READY.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from pea.evaluate import Evaluation
from pea.spec import LanguageSpec, home
from pea.table import data_fingerprint
from pea.train import TrainResult

SERVING_MODEL = Path(__file__).with_name("serving.py")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'tracking' / 'mlflow.db'}"


def model_name(language: str) -> str:
    return f"pea-adapter-{language}"


@dataclass(frozen=True)
class Registration:
    tracking_uri: str
    experiment: str
    run_id: str
    name: str
    version: str
    champion: bool

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@champion"


def _experiment(language: str) -> str:
    name = f"pea-{language}"
    if mlflow.get_experiment_by_name(name) is None:
        # A SQLite store keeps its artifacts beside the DB file, not in ./mlruns of the working directory.
        uri = tracking_uri()
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name).as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    return name


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]
    return flat


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := client.get_model_version(name, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} is {status}, not READY; see the MLflow server log")
        time.sleep(0.5)


def lineage(spec: LanguageSpec, pairs_path: Path) -> dict[str, str]:
    """What a model version was made from: models, data and code."""
    try:
        code = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home(), capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        code = "pea " + importlib.metadata.version("pea")
    return {"language": spec.language, "teacher_id": spec.teacher.id, "teacher_revision": str(spec.teacher.revision),
            "student_id": spec.student.id, "student_revision": str(spec.student.revision),
            "data_fingerprint": data_fingerprint(pairs_path), "code_version": code}


def register(spec: LanguageSpec, trained: TrainResult, evaluation: Evaluation, artifacts: list[Path],
             pairs_path: Path) -> Registration:
    """Log the run (params, per-step metrics, evaluation, images), register and alias the adapter."""
    lineage_tags = lineage(spec, pairs_path)
    mlflow.set_tracking_uri(uri := tracking_uri())
    experiment = _experiment(spec.language)
    mlflow.set_experiment(experiment)
    name = model_name(spec.language)
    client = MlflowClient()
    with mlflow.start_run(run_name=trained.run_dir.name) as run:
        mlflow.set_tags({"pea." + k: v for k, v in lineage_tags.items()})
        mlflow.log_params(_flatten(spec.model_dump(mode="json", exclude={"synthetic_captions"})))
        mlflow.log_dict(spec.model_dump(mode="json"), "spec.json")
        mlflow.log_dict(trained.ds_config, "ds_config.json")
        history = [json.loads(line) for line in trained.history_path.read_text().splitlines()]
        now = int(time.time() * 1000)
        metrics = [Metric(f"train/{k}", float(v), now, h["step"]) for h in history for k, v in h.items() if k != "step"]
        for start in range(0, len(metrics), 1000):  # MLflow's per-batch cap
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        mlflow.log_metrics({f"eval/{k}": v for k, v in evaluation.metrics().items()})
        for path in [trained.loss_curve, evaluation.grid, evaluation.report, *artifacts]:
            mlflow.log_artifact(str(path))
        info = mlflow.pyfunc.log_model(
            name="adapter", python_model=str(SERVING_MODEL), artifacts={"adapter": str(trained.adapter_dir)},
            model_config={"student_id": spec.student.id, "student_revision": spec.student.revision,
                          "student_max_length": spec.student.max_length, "language": spec.language},
            # Stated, not inferred: inference would import the model in a subprocess just to list these.
            pip_requirements=["torch==2.13.0", "diffusers>=0.42.1,<0.43", "transformers>=5.24,<5.25",
                              "safetensors>=0.8,<0.9", "mlflow>=3.17.2,<3.18"],
            registered_model_name=name)
    version = str(info.registered_model_version)
    _wait_ready(client, name, version)
    for key, value in {**lineage_tags, "run_id": run.info.run_id, **{f"eval.{k}": f"{v:.6g}" for k, v in
                                                                 evaluation.metrics().items()}}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "challenger", version)
    champion = evaluation.relative_error["trained"] < evaluation.relative_error["untrained"]
    client.set_model_version_tag(name, version, "promotion",
                                 "champion: beats the untrained adapter" if champion else
                                 "not promoted: no better than the untrained adapter")
    if champion:
        client.set_registered_model_alias(name, "champion", version)
    return Registration(uri, experiment, run.info.run_id, name, version, champion)


def fetch_adapter(model_uri: str, dst: Path) -> tuple[Path, dict[str, str]]:
    """Download a registered adapter (`models:/name@alias` or `models:/name/version`) and its lineage tags."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        raise ValueError(f"model URI {model_uri!r} must look like models:/<name>@<alias> or models:/<name>/<version>")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(dst)))
    return local / "artifacts" / "adapter", dict(version.tags)
