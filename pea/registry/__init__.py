"""MLflow: log a training run, register its adapter as `pea-adapter-<lang>`, decide promotion.

    register(spec, trained, evaluation, artifacts, pairs_path) -> Registration

The embedded default keeps MLflow under `tracking/` (SQLite + local artifacts); set MLFLOW_TRACKING_URI to use
a server instead (tracking/README.md). One experiment per language (`pea-<lang>`).

Promotion: the new version always becomes `challenger`. `champion` moves to it only when the spec's rule
(`evaluate.promotion_metric`, `evaluate.promotion_tolerance`) holds against the CURRENT champion, both
re-evaluated now on the same held-out pairs (same latents, noise, timesteps; or the same prompt sets and
seeds for CLIPScore). The decision and both figures are recorded as version tags (`promotion.*`). Aliases are
set only once the version is READY and tagged. The version's description is its model card (pea.registry.model_card), the
registered model's is written by each champion; the pyfunc's model_config records what generation needs
(pea.registry.record). Registration is idempotent per training run and bounded when the server does not answer
(pea/registry/registration.py). Runs of the same language must not register at the same time (the flow's
per-language concurrency limit ensures it); different languages never touch each other's model or experiment.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from pea.evaluate import Evaluation
from pea.io.redact import masked_errors, redact, redact_all
from pea.registry.curves import curve
from pea.registry.model_card import model_card
from pea.registry.record import model_config
from pea.registry.registration import (
    COMPLETE,
    KEY_TAG,
    STATE_TAG,
    abandon,
    find,
    http_defaults,
    promotion_tags,
    recorded_decision,
    registration_key,
    set_promotion_tags,
    tracking_uri,
    unreachable,
    wait_ready,
)
from pea.spec import LanguageSpec, home
from pea.spec.hub import pinned_revision
from pea.train import TrainResult
from pea.train.shards import (
    Packed,
    data_fingerprint,  # noqa: F401 (what the data_fingerprint tag holds; callers compare with it)
    fingerprint,
)

log = logging.getLogger("pea.registry")
SERVING_MODEL = Path(__file__).with_name("serving.py")
# diffusers' and transformers' from_pretrained build modules under a process-global meta-device context, so a
# module constructed in another thread meanwhile lands on `meta`. Two registrations in one process (threads)
# therefore take turns for the parts that build models: the input example's prediction and the promotion scores.
_MODELS = threading.RLock()
PIP_REQUIREMENTS = ["torch==2.13.0", "diffusers>=0.42.1,<0.43", "transformers>=5.24,<5.25", "safetensors>=0.8,<0.9",
                    "mlflow>=3.17.2,<3.18", "pydantic>=2.10,<3", "pyyaml>=6"]


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
    promotion: dict[str, str] = field(default_factory=dict)  # the promotion.* tags of the version

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@champion"


def _experiment_id(client: MlflowClient, language: str, uri: str) -> tuple[str, str]:
    name = f"pea-{language}"
    if (found := client.get_experiment_by_name(name)) is not None:
        return name, found.experiment_id
    # A SQLite store keeps its artifacts beside the DB file, not in ./mlruns of the working directory; a server
    # decides for itself (its --artifacts-destination).
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name).as_uri()
    try:
        return name, client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it in between
        if (found := client.get_experiment_by_name(name)) is None:
            raise
        return name, found.experiment_id


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = redact(str(value))[:500]  # e.g. a signed manifest URL: masked
    return flat


def log_spec(client: MlflowClient, run_id: str, spec: LanguageSpec, lineage_tags: dict[str, str]) -> None:
    """The run's lineage tags, the spec as params and as spec.json, credentials masked (a signed manifest URL,
    a URL with a password): whoever can read the run sees the settings, not the secrets."""
    for key, value in lineage_tags.items():
        client.set_tag(run_id, "pea." + key, redact(value))
    items = list(_flatten(spec.model_dump(mode="json", exclude={"synthetic_captions"})).items())
    for start in range(0, len(items), 100):  # MLflow's per-batch cap for params
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
    client.log_dict(run_id, redact_all(spec.model_dump(mode="json")), "spec.json")


def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home(), capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pea"], cwd=home(), capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "pea " + importlib.metadata.version("pea")


def lineage(spec: LanguageSpec, pairs_path: Path, data: str | None = None) -> dict[str, str]:
    """What a model version was made from: models (Hub revisions as the commits they name), data and code. `data`:
    the pairs' fingerprint as the pack recorded it; without it the pairs are fingerprinted (once a process)."""
    return {"language": spec.language, "teacher_id": spec.teacher.id,
            "teacher_revision": str(pinned_revision(spec.teacher.id, spec.teacher.revision)),
            "student_id": spec.student.id, "student_revision": str(pinned_revision(spec.student.id, spec.student.revision)),
            "data_fingerprint": data or fingerprint(pairs_path), "code_version": code_version()}


def _pack_of(evaluation: Evaluation) -> Packed | None:
    """The pack `evaluation` scored, opened (not made again); None where it does not say or the pack is gone."""
    try:
        return Packed.open(evaluation.pack_root) if evaluation.pack_root is not None else None
    except FileNotFoundError:
        return None


def signature(spec: LanguageSpec, trained: TrainResult) -> ModelSignature:
    """Prompts (a list of strings: one unnamed string column) → prompt_embeds (B, max_length, token_dim) [+ pooled_prompt_embeds]."""
    config = json.loads((trained.adapter_dir / "config.json").read_text())
    tokens = config.get("output_tokens") or spec.student.max_length  # the teacher's count with a token mixer
    outputs = [TensorSpec(np.dtype(np.float32), (-1, tokens, config["token_dim"]), "prompt_embeds")]
    if config.get("pooled_dim") and config.get("kind") == "sdxl":
        outputs.append(TensorSpec(np.dtype(np.float32), (-1, config["pooled_dim"]), "pooled_prompt_embeds"))
    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]), outputs=Schema(outputs))


# --- promotion -----------------------------------------------------------------------------------------------------

def _current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def score(spec: LanguageSpec, evaluation: Evaluation, adapter_dirs: dict[str, Path],
          students: dict[str, object] | None = None) -> dict[str, float]:
    """The promotion metric of each adapter, all computed now under identical conditions: the held-out pairs of
    `evaluation` with the spec's fixed noise and timesteps (rel_error), or its prompt sets at fixed seeds (clip).
    `students` maps an adapter to the StudentSpec it was trained with when that is not the spec's."""
    from pea import evaluate as ev
    from pea import models
    from pea.evaluate.baselines import untrained_like
    from pea.train.table import load_table

    if evaluation.pairs_path is None or evaluation.embedded is None:
        raise ValueError("this Evaluation does not say which pairs and stores it was computed on; evaluate again "
                         "with pea.evaluate.evaluate (it records pairs_path and embedded)")
    students = students or {}
    adapters = {k: ev.PEAAdapter.from_pretrained(p).eval().to(models.device()) for k, p in adapter_dirs.items()}
    adapters["untrained"] = untrained_like(next(iter(adapters.values())), spec.train.seed).to(models.device())
    if spec.evaluate.promotion_metric == "rel_error":
        table = load_table(spec, evaluation.pairs_path, evaluation.embedded, "heldout",
                           packed=_pack_of(evaluation)).with_english()
        chunk = spec.embed.text_batch_size  # an encoder never sees the whole held-out sample in one batch
        states = {}
        for key, ref in students.items():
            if ref != spec.student:
                encoder = models.load_student(ref)
                states[key] = torch.cat([encoder.encode(table.captions[i:i + chunk])
                                         for i in range(0, len(table), chunk)])
        return ev.relative_errors(spec, table, adapters, states)
    cfg = spec.evaluate
    pipe = models.load_pipeline(spec.teacher, dtype=models.inference_dtype(spec.train.precision))
    clip = ev.ModelRef(id=cfg.clip_model, revision=cfg.clip_revision)
    totals = {k: [] for k in adapters}
    for name in cfg.prompt_sets:
        prompts = ev.load_prompts(spec.language, name, cfg.prompts_per_set)
        seeds = [cfg.seed + i for i in range(len(prompts))]
        for key, adapter in adapters.items():
            student = models.load_student(students.get(key, spec.student))
            images = ev._draw(spec, pipe, student, {key: adapter}, prompts, seeds)[key]
            totals[key].append(ev.clip_scores(clip, images, [t for t, _ in prompts]))
    return {k: float(np.mean(v)) for k, v in totals.items()}


def decide(spec: LanguageSpec, scores: dict[str, float], has_champion: bool) -> tuple[bool, str]:
    """The promotion rule on scores {"challenger", "untrained"[, "champion"]}: (promote, why)."""
    cfg = spec.evaluate
    lower = cfg.promotion_metric == "rel_error"
    tol = cfg.promotion_tolerance
    new = scores["challenger"]
    if cfg.promotion_requires_beating_untrained and not (new < scores["untrained"] if lower
                                                         else new > scores["untrained"]):
        return False, f"{cfg.promotion_metric} {new:.6g} does not beat the untrained adapter's {scores['untrained']:.6g}"
    if not has_champion:
        return True, "no champion yet" + (" and it beats the untrained adapter"
                                           if cfg.promotion_requires_beating_untrained else "")
    old = scores["champion"]
    bound = old * (1 + tol) if lower else old * (1 - tol)
    if (new <= bound) if lower else (new >= bound):
        return True, (f"{cfg.promotion_metric} {new:.6g} vs champion {old:.6g}: within the allowed "
                      f"{'ceiling' if lower else 'floor'} {bound:.6g} (tolerance {tol:g})")
    return False, (f"{cfg.promotion_metric} {new:.6g} vs champion {old:.6g}: a regression beyond the allowed "
                   f"{'ceiling' if lower else 'floor'} {bound:.6g} (tolerance {tol:g})")


def promote(spec: LanguageSpec, evaluation: Evaluation, name: str, version: str, adapter_dir: Path,
            client: MlflowClient) -> tuple[bool, dict[str, str]]:
    """Compare version `version` with the current champion, record the decision as tags, move the alias if won."""
    from pea.evaluate import student_ref

    champion = _current_champion(client, name)
    tags = {"promotion.metric": spec.evaluate.promotion_metric,
            "promotion.tolerance": f"{spec.evaluate.promotion_tolerance:g}",
            "promotion.rule": ("lower is better" if spec.evaluate.promotion_metric == "rel_error" else
                               "higher is better") + "; must not regress beyond the tolerance against the champion"
                              + ("; must beat the untrained adapter"
                                 if spec.evaluate.promotion_requires_beating_untrained else "")}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"challenger": adapter_dir}
        students = {}
        if champion is not None and str(champion.version) != version:
            ours = (spec.teacher.id, str(pinned_revision(spec.teacher.id, spec.teacher.revision)))
            theirs = (champion.tags.get("teacher_id"), champion.tags.get("teacher_revision"))
            if theirs != ours:  # a champion tagged with a branch name (before commits were pinned) also lands here
                tags |= {"promotion.decision": "refused", "promotion.champion_version": str(champion.version),
                         "promotion.reason": f"the champion was made for teacher {theirs[0]} at {theirs[1]}, this "
                                             f"version for {ours[0]} at {ours[1]}; a different base model cannot be "
                                             "compared: set the alias by hand"}
                set_promotion_tags(client, name, version, tags)
                return False, tags
            dirs["champion"] = Path(mlflow.artifacts.download_artifacts(
                f"models:/{name}/{champion.version}", dst_path=tmp)) / "artifacts" / "adapter"
            students["champion"] = student_ref(champion.tags, spec)
        with _MODELS:
            scores = score(spec, evaluation, dirs, students)
    won, why = decide(spec, scores, "champion" in dirs)
    tags |= {"promotion.decision": "promoted" if won else "refused", "promotion.reason": why,
             "promotion.challenger": f"{scores['challenger']:.6g}", "promotion.untrained": f"{scores['untrained']:.6g}",
             "promotion.heldout_pairs": str(evaluation.heldout_pairs)}
    if "champion" in dirs:
        tags |= {"promotion.champion": f"{scores['champion']:.6g}", "promotion.champion_version": str(champion.version)}
    set_promotion_tags(client, name, version, tags)
    if won:
        client.set_registered_model_alias(name, "champion", version)
    return won, tags


# --- register ------------------------------------------------------------------------------------------------------

def _example(spec: LanguageSpec, evaluation: Evaluation) -> str:
    """A prompt in the language: the first of the first prompt set, else the first held-out grid caption (the toy
    world has no prompt sets)."""
    from pea.evaluate import load_prompts

    try:
        return load_prompts(spec.language, spec.evaluate.prompt_sets[0], 1)[0][0]
    except (FileNotFoundError, ValueError, IndexError):
        pass
    try:
        return json.loads(evaluation.report.read_text(encoding="utf-8"))["grid_captions"][0][spec.language]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def _describe(client: MlflowClient, spec: LanguageSpec, evaluation: Evaluation, pairs_path: Path, name: str,
              version: str, run_id: str, tags: dict[str, str], champion: bool, promotion: dict[str, str]) -> None:
    """The version's card as its description; the registered model's too when this version is the champion (or
    the model has none yet). Written whole again by a rerun that finishes this registration."""
    model_text, version_text = model_card(spec, evaluation, pairs_path, _pack_of(evaluation), name=name,
                                          version=version, run_id=run_id, tags=tags, promotion=promotion,
                                          example=_example(spec, evaluation))
    client.update_model_version(name, version, description=version_text)
    if champion or not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_text)


@masked_errors()  # a failure names the tracking URI, which may hold a password
def register(spec: LanguageSpec, trained: TrainResult, evaluation: Evaluation, artifacts: list[Path],
             pairs_path: Path) -> Registration:
    """Log the run (spec, ds_config, loss curves, evaluation tables and grids, data-quality report), register the
    adapter as a pyfunc model with lineage tags, make it `challenger`, and decide whether it becomes `champion`.

    Idempotent per training run (pea.registry.registration): a rerun after a completed registration returns it and logs
    nothing; a rerun after one that died finishes it, or starts afresh if it died before its model version existed.
    A server that does not answer fails within registration.bound_s() a request, naming the URI and the fix."""
    started = time.monotonic()
    http_defaults()
    uri = tracking_uri()
    try:
        with masked_errors():  # in place, before `down` quotes it: a traceback prints the whole chain
            return _register(spec, trained, evaluation, artifacts, pairs_path, uri)
    except Exception as err:
        if (down := unreachable(err, uri, started)) is not None:
            raise down from err
        raise


def _register(spec: LanguageSpec, trained: TrainResult, evaluation: Evaluation, artifacts: list[Path],
              pairs_path: Path, uri: str) -> Registration:
    packed = _pack_of(evaluation)  # its index holds the pairs' fingerprint: no scan of the pairs here
    lineage_tags = lineage(spec, pairs_path, packed.fingerprint if packed is not None else None)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment, experiment_id = _experiment_id(client, spec.language, uri)
    name = model_name(spec.language)
    key = registration_key(trained.run_dir, trained.adapter_dir)
    found = find(client, experiment_id, name, key)
    if found.complete:
        promotion = promotion_tags(client.get_model_version(name, found.version.version).tags)
        log.info("%s/%s is already registered for %s; nothing to do", name, found.version.version, key)
        return Registration(uri, experiment, found.version.run_id, name, str(found.version.version),
                            promotion.get("promotion.decision") == "promoted", promotion)
    if found.version is None:
        abandon(client, found.runs)  # attempts that died before MLflow created their version
        created = _log_run(spec, trained, evaluation, artifacts, client, experiment_id, name, key, lineage_tags)
        # MLflow's client retries a POST whose answer timed out: the create may have made two versions.
        found = find(client, experiment_id, name, key, keep=created)
    else:
        log.warning("finishing %s/%s for %s: an earlier registration stopped before completing it", name,
                    found.version.version, key)
    # str: a SQLite store's search returns the number as an int, a server's as a string
    version, run_id = str(found.version.version), found.version.run_id
    abandon(client, found.runs, keep=run_id)
    # RUNNING after a kill, FAILED after a create whose answer never came; but log_model is the run's last step,
    # so a run with a version has everything logged.
    if client.get_run(run_id).info.status != "FINISHED":
        client.set_terminated(run_id, "FINISHED")
    wait_ready(client, name, version)
    for key_, value in {**lineage_tags, "run_id": run_id,
                        **{f"eval.{k}": f"{v:.6g}" for k, v in evaluation.metrics().items()}}.items():
        client.set_model_version_tag(name, version, key_, redact(value))
    client.set_registered_model_alias(name, "challenger", version)
    decided = recorded_decision(client, name, version)
    champion, promotion = decided or promote(spec, evaluation, name, version, trained.adapter_dir, client)
    _describe(client, spec, evaluation, pairs_path, name, version, run_id, lineage_tags, champion, promotion)
    client.set_model_version_tag(name, version, STATE_TAG, COMPLETE)  # last: every tag, alias and description is set
    return Registration(uri, experiment, run_id, name, version, champion, promotion)


def _log_run(spec: LanguageSpec, trained: TrainResult, evaluation: Evaluation, artifacts: list[Path],
             client: MlflowClient, experiment_id: str, name: str, key: str, lineage_tags: dict[str, str]) -> str:
    """Log a new run with everything, its adapter last as model version N of `name`; returns N."""
    metrics_now = evaluation.metrics()
    # An explicit experiment id (not mlflow.set_experiment, which is process-global) so that two languages
    # registering from two threads of one process cannot log into each other's experiment. The key is set with the
    # run's creation, so no attempt leaves a run that a rerun cannot find.
    with mlflow.start_run(experiment_id=experiment_id, run_name=trained.run_dir.name, tags={KEY_TAG: key}) as run:
        run_id = run.info.run_id
        log_spec(client, run_id, spec, lineage_tags)
        mlflow.log_dict(trained.ds_config, "ds_config.json")
        now = int(time.time() * 1000)
        metrics = curve(trained.history_path, now) + [Metric(f"eval/{k}", float(v), now, 0)
                                                      for k, v in metrics_now.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's per-batch cap for metrics
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        mlflow.log_table({k: [r[k] for r in evaluation.rows()] for k in evaluation.rows()[0]},
                         "evaluation/table.json")
        for path in [trained.loss_curve, trained.history_path]:
            mlflow.log_artifact(str(path), "training")
        for path in [evaluation.grid, evaluation.report, evaluation.table, *evaluation.grids.values()]:
            if path is not None:
                mlflow.log_artifact(str(path), "evaluation")
        for path in artifacts:
            mlflow.log_artifact(str(path), "data")
        with _MODELS:
            info = mlflow.pyfunc.log_model(
                name="adapter", python_model=str(SERVING_MODEL), artifacts={"adapter": str(trained.adapter_dir)},
                model_config=model_config(spec),  # the generation record (pea.registry.record)
                signature=signature(spec, trained), input_example=[_example(spec, evaluation)],
                # Stated, not inferred: inference would import the model in a subprocess just to list these.
                pip_requirements=PIP_REQUIREMENTS, registered_model_name=name)
    return str(info.registered_model_version)
