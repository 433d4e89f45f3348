"""The registry through a real `mlflow server` on 127.0.0.1: lineage, promotion, the model cards and the generation
record, the pyfunc in a fresh process, two languages registering at once, `pea eval` and `pea generate` from a
version's URI alone (and a version older than the record), and registration under faults: killed at a chosen point
and rerun, a server that is down, a server too slow for MLflow's client (which then POSTs twice)."""

import dataclasses
import http.client
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pytest
import torch
from conftest import evaluated_variant, quick_spec
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow_server import free_port, mlflow_server

from pea import embed, registry
from pea.corpus.synthetic import all_scenes, write_pairs
from pea.evaluate import evaluate
from pea.evaluate.baselines import untrained_like
from pea.io.results import encode
from pea.method.adapter import PEAAdapter
from pea.models import load_student
from pea.models.pipeline import prompt_kwargs
from pea.registry.curves import CURVE_POINTS
from pea.registry.registration import (
    COMPLETE,
    HTTP_DEFAULTS,
    KEY_TAG,
    STATE_TAG,
    backoff_s,
    promotion_tags,
    registration_key,
)
from pea.spec import load_spec


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        uri = running.url
        patch = pytest.MonkeyPatch()
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        patch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")  # stated: pea's defaults leave the process as it was
        try:
            yield uri
        finally:
            # register() sets MLflow's process-global URI, which outranks MLFLOW_TRACKING_URI: a later module's fluent
            # calls (mlflow.artifacts.load_dict) would go to this server, gone by then.
            mlflow.set_tracking_uri(None)
            patch.undo()


@pytest.fixture(scope="module")
def cycle(server, trained_sd15, tmp_path_factory):
    """Three versions of zh, weights blended between the initialisation and the trained adapter: half way (first:
    champion), 15 % of the way (worse than the champion, better than untrained: refused as a regression), the
    trained adapter (better: promoted). Each: (Registration, Evaluation, spec, TrainResult)."""
    tmp = tmp_path_factory.mktemp("variants")
    t = trained_sd15
    trained = PEAAdapter.from_pretrained(t.adapter_dir).eval()
    untrained = untrained_like(trained, t.spec.train.seed)

    def blend(share: float) -> PEAAdapter:
        mixed = untrained_like(trained, t.spec.train.seed)
        mixed.load_state_dict({k: (1 - share) * v + share * trained.state_dict()[k]
                               for k, v in untrained.state_dict().items()})
        return mixed

    registered = {}
    for name, adapter in (("blend", blend(0.5)), ("worse", blend(0.15)), ("trained", trained)):
        spec, result, evaluation = evaluated_variant(t, name, adapter, tmp)
        registered[name] = (registry.register(spec, result, evaluation, [t.pairs], t.pairs), evaluation, spec, result)
    return registered


def test_every_version_carries_lineage_and_evaluation_tags(cycle, trained_sd15, server):
    reg, evaluation = cycle["trained"][:2]
    assert reg.tracking_uri == server and reg.model_uri == "models:/pea-adapter-zh/3"
    client = MlflowClient(server)
    tags = client.get_model_version(reg.name, reg.version).tags
    spec = trained_sd15.spec
    assert tags["language"] == "zh" and tags["teacher_id"] == spec.teacher.id and tags["student_id"] == spec.student.id
    assert tags["teacher_revision"] == "None" and tags["student_revision"] == "None"
    assert tags["data_fingerprint"] == registry.data_fingerprint(trained_sd15.pairs)
    assert len(tags["code_version"].split("+")[0]) == 40 and tags["run_id"] == reg.run_id
    assert float(tags["eval.rel_error_trained"]) == pytest.approx(evaluation.relative_error["trained"], rel=1e-5)
    assert {"eval.clip_general_trained", "eval.rel_error_linear_map", "eval.image_mse_untrained"} <= set(tags)
    run = client.get_run(reg.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "pea-zh"
    assert run.data.tags["pea.data_fingerprint"] == tags["data_fingerprint"]
    logged = {a.path for folder in ("training", "evaluation", "data") for a in client.list_artifacts(reg.run_id, folder)}
    assert {"training/loss.png", "evaluation/grid.png", "evaluation/grid-culture.png", "evaluation/evaluation.csv",
            "data/" + trained_sd15.pairs.name} <= logged
    steps = trained_sd15.result.steps  # every step's loss, as window means of k steps at each window's last step
    k = math.ceil(steps / CURVE_POINTS)
    assert [m.step for m in client.get_metric_history(reg.run_id, "train/loss")] == [
        min(start + k, steps) for start in range(0, steps, k)]


def test_every_version_reads_as_a_model_card_and_records_what_generation_needs(cycle, trained_sd15, server):
    client = MlflowClient(server)
    reg, spec = cycle["trained"][0], trained_sd15.spec
    version = client.get_model_version(NAME, reg.version)
    card = version.description
    assert card.startswith(f"# {NAME} v3: PEA adapter for Chinese (Simplified)") and len(card) <= 5000
    for text in (spec.teacher.id, spec.student.id, version.tags["data_fingerprint"], "| **trained** |", "linear_map",
                 "clip_culture", "**promoted**", "`evaluation/grid.png`", "`evaluation/grid-general.png`",
                 f"runs:/{reg.run_id}/evaluation/grid.png", f'mlflow.pyfunc.load_model("{reg.model_uri}")',
                 f"pea generate --model-uri {reg.model_uri}", "`teacher_kind` sd15", "`image_size` 32"):
        assert text in card, text
    assert "**refused**" in client.get_model_version(NAME, "2").description
    logged = {a.path for a in client.list_artifacts(reg.run_id, "evaluation")}
    assert {"evaluation/grid.png", "evaluation/grid-general.png", "evaluation/grid-culture.png"} <= logged
    model = client.get_registered_model(NAME).description  # written by the champion, v3
    assert model.startswith(f"# {NAME}: PEA adapter") and "(version 3 when" in model
    assert "pea generate --language zh" in model and f"models:/{NAME}@champion" in model
    record = mlflow.models.get_model_info(reg.model_uri).flavors["python_function"]["config"]
    assert record | {"scheduler": None} == {
        "record": 1, "language": "zh", "teacher_id": spec.teacher.id, "teacher_revision": None, "teacher_variant": None,
        "teacher_kind": "sd15", "teacher_pixel_space": False, "teacher_safety_checker": False,
        "student_id": spec.student.id, "student_revision": None, "student_variant": None, "student_max_length": 16,
        "student_trained_length": None, "scheduler": None, "guidance_scale": 7.5, "num_inference_steps": 10,
        "image_size": 32, "precision": "fp32"}
    assert record["scheduler"].endswith("Scheduler")
    # The card's usage snippet runs as it is: the pyfunc, then the stock pipeline.
    scope: dict = {}
    exec(re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1), scope)  # noqa: S102 - the card's own text
    assert scope["image"].size == (32, 32)


def test_promotion_refuses_a_worse_challenger_and_accepts_a_better_one(cycle, server):
    client = MlflowClient(server)
    blend, worse, trained = (cycle[k][0] for k in ("blend", "worse", "trained"))
    figures = {k: cycle[k][1].relative_error["trained"] for k in cycle}
    untrained = cycle["trained"][1].relative_error["untrained"]
    assert figures["trained"] < figures["blend"] < figures["worse"] < untrained  # the premise, measured
    assert blend.champion and blend.promotion["promotion.reason"].startswith("no champion yet")
    # v2 beats the untrained adapter but not the champion (v1), re-scored now on the same held-out set.
    assert not worse.champion and worse.promotion["promotion.decision"] == "refused"
    assert "regression beyond the allowed ceiling" in worse.promotion["promotion.reason"]
    assert worse.promotion["promotion.champion_version"] == "1"
    assert float(worse.promotion["promotion.champion"]) == pytest.approx(figures["blend"], rel=1e-4)
    assert float(worse.promotion["promotion.challenger"]) == pytest.approx(figures["worse"], rel=1e-4)
    # The trained adapter beat v1 (still champion when it was compared) and took the alias.
    assert trained.champion and trained.promotion["promotion.decision"] == "promoted"
    assert trained.promotion["promotion.champion_version"] == "1"
    assert client.get_model_version_by_alias("pea-adapter-zh", "champion").version == "3"
    assert client.get_model_version_by_alias("pea-adapter-zh", "challenger").version == "3"
    tags = client.get_model_version("pea-adapter-zh", "2").tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion"] == worse.promotion["promotion.champion"]


def test_tolerance_and_metric_direction_of_the_rule(trained_sd15):
    spec = trained_sd15.spec
    tolerant = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"promotion_tolerance": 0.1})})
    scores = {"challenger": 1.05, "champion": 1.0, "untrained": 2.0}
    assert registry.decide(spec, scores, True)[0] is False
    assert registry.decide(tolerant, scores, True)[0] is True
    clip = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"promotion_metric": "clip_score"})})
    assert registry.decide(clip, {"challenger": 30.0, "champion": 29.0, "untrained": 20.0}, True)[0] is True
    assert registry.decide(clip, {"challenger": 30.0, "champion": 31.0, "untrained": 20.0}, True)[0] is False
    assert registry.decide(clip, {"challenger": 19.0, "untrained": 20.0}, False) == (
        False, "clip_score 19 does not beat the untrained adapter's 20")


def test_the_champion_loads_as_a_pyfunc_in_a_fresh_process(cycle, trained_sd15, server, tmp_path):
    out = tmp_path / "embeds.npy"
    code = f"""
import json, mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/pea-adapter-zh@champion")
pred = model.predict(["左边有一个红色的圆形", "右边有两个蓝色的正方形"])
np.save({str(out)!r}, pred["prompt_embeds"])
sig = model.metadata.signature
print(json.dumps({{"inputs": [c["type"] for c in sig.inputs.to_dict()], "outputs": sig.outputs.input_names(),
                   "example": model.metadata.saved_input_example_info is not None}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "PEA_"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert meta == {"inputs": ["string"], "outputs": ["prompt_embeds"], "example": True}
    adapter = PEAAdapter.from_pretrained(trained_sd15.adapter_dir).eval()
    expected = prompt_kwargs(adapter, load_student(trained_sd15.spec.student),
                             ["左边有一个红色的圆形", "右边有两个蓝色的正方形"])["prompt_embeds"]
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_two_languages_register_at_once_without_interfering(server, trained_sd15, zoo_dir, tmp_path_factory):
    t = trained_sd15
    lake = tmp_path_factory.mktemp("ja")
    ja = quick_spec(load_spec("ja", "embedded", zoo_dir=zoo_dir))

    client = MlflowClient(server)
    # zh's next version: whatever this file registered before (the cycle's three, when it ran first)
    zh_next = max((int(v.version) for v in client.search_model_versions("name='pea-adapter-zh'")), default=0) + 1
    pairs = write_pairs(lake, ja, all_scenes())
    stores = embed.embed(ja, lake, pairs)
    # ja: an untrained adapter for its own student (registered, never promoted); zh: a copy of the trained one
    # under a fresh language code would be a lie, so zh registers its trained adapter again (its next version).
    ja_dir = lake / "ja-run" / "adapter"
    torch.manual_seed(0)
    PEAAdapter(**{k: v for k, v in PEAAdapter.load_config(t.adapter_dir).items() if not k.startswith("_")}
               ).save_pretrained(ja_dir)
    ja_eval = evaluate(ja, pairs, stores, ja_dir, lake / "ja-run" / "evaluation")
    ja_result = dataclasses.replace(t.result, adapter_dir=ja_dir, run_dir=lake / "ja-run")
    zh_spec, zh_result, zh_eval = evaluated_variant(t, "zh-again", PEAAdapter.from_pretrained(t.adapter_dir),
                                          tmp_path_factory.mktemp("zh"))
    barrier = threading.Barrier(2)

    def run(args):
        barrier.wait(timeout=60)
        return registry.register(*args)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, (zh_spec, zh_result, zh_eval, [], t.pairs)),
                   pool.submit(run, (ja, ja_result, ja_eval, [], pairs))]
        zh_reg, ja_reg = (f.result(timeout=300) for f in futures)
    assert (ja_reg.name, ja_reg.version) == ("pea-adapter-ja", "1")
    assert (zh_reg.name, zh_reg.version) == ("pea-adapter-zh", str(zh_next))
    for reg, language, data in ((zh_reg, "zh", t.pairs), (ja_reg, "ja", pairs)):
        tags = client.get_model_version(reg.name, reg.version).tags
        assert tags["language"] == language and tags["run_id"] == reg.run_id
        assert tags["data_fingerprint"] == registry.data_fingerprint(data)
        run = client.get_run(reg.run_id)
        assert client.get_experiment(run.info.experiment_id).name == f"pea-{language}"
        assert run.data.params["language"] == language
        assert client.get_model_version_by_alias(reg.name, "challenger").version == reg.version
    assert not ja_reg.champion and "untrained" in ja_reg.promotion["promotion.reason"]


@pytest.fixture
def lake(zoo_dir, tmp_path, monkeypatch) -> Path:
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "zoo").symlink_to(zoo_dir)  # the embedded profile names models under <lake>/zoo
    monkeypatch.setenv("PEA_LAKE", str(lake))
    return lake


def test_pea_eval_prints_the_table_for_the_champion_from_its_uri_alone(cycle, trained_sd15, server, lake, tmp_path,
                                                                       capsys):
    """No --language, no --profile: the version's record names the models, its run's spec the evaluation."""
    from pea.cli import main
    from pea.registry.record import eval_spec, fetch

    main(["eval", "--model-uri", "models:/pea-adapter-zh@champion", "--pairs", str(trained_sd15.pairs), "--out",
          str(tmp_path / "eval")])
    out = capsys.readouterr().out
    # the cycle's v3, or a better zh version an earlier test of this file registered (two languages at once)
    champion = MlflowClient(server).get_model_version_by_alias("pea-adapter-zh", "champion").version
    assert f"models:/pea-adapter-zh@champion (version {champion})" in out
    assert all(s in out for s in ("teacher_en", "trained", "untrained", "linear_map", "clip_culture"))
    assert (tmp_path / "eval" / "grid-general.png").is_file()
    # A wrong profile changes nothing (a pixel-space teacher, other sizes): the spec is the registered one.
    fetched = fetch("models:/pea-adapter-zh/3", tmp_path / "fetched")
    registered = eval_spec(fetched, tmp_path / "a", None, None)
    assert eval_spec(fetched, tmp_path / "b", "zh", "embedded,toy") == registered == cycle["trained"][2]
    with pytest.raises(SystemExit) as refused:  # one line on stderr naming the version and the fix, exit 1
        main(["eval", "--language", "zh", "--profile", "embedded", "--model-uri", "models:/pea-adapter-zh/99",
              "--pairs", str(trained_sd15.pairs)])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "models:/pea-adapter-zh/99 cannot be read from the registry" in err
    assert "pass --model-uri of a registered version" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("profile", [None, "embedded,toy"])
def test_pea_generate_draws_with_the_champion_whatever_the_profile(profile, cycle, lake, tmp_path, capsys):
    """Without a profile the spec names real models (SD 1.5, Chinese-CLIP, 512 px); embedded,toy a pixel-space
    teacher: the version's record wins either way, its size and steps the defaults."""
    from PIL import Image

    from pea.cli import main

    out = tmp_path / "a.png"
    main(["generate", "--language", "zh", "--prompt", "左边有一个红色的圆形", "--steps", "2", "--out", str(out)]
         + (["--profile", profile] if profile else []))
    printed = capsys.readouterr().out
    assert Image.open(out).size == (32, 32) and "models:/pea-adapter-zh@champion" in printed
    assert "sd15-teacher; 2 steps, guidance 7.5, 32 px" in printed
    with pytest.raises(SystemExit) as refused:
        main(["generate", "--language", "ja", "--model-uri", "models:/pea-adapter-zh/3", "--prompt", "赤い丸"])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "models:/pea-adapter-zh/3 is an adapter for zh, not ja; pass --language zh" in err


@pytest.fixture(scope="module")
def legacy(cycle, trained_sd15, server) -> str:
    """A version as pea registered them before the generation record: model_config holds the student alone."""
    from pea.registry.record import model_config

    old = {k: v for k, v in model_config(trained_sd15.spec).items() if k.startswith("student_") or k == "language"}
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="adapter", python_model=str(registry.SERVING_MODEL),
                                       artifacts={"adapter": str(trained_sd15.adapter_dir)}, model_config=old,
                                       pip_requirements=registry.PIP_REQUIREMENTS, registered_model_name=LEGACY)
    version = str(info.registered_model_version)
    for key, value in {"teacher_id": trained_sd15.spec.teacher.id, "student_id": trained_sd15.spec.student.id}.items():
        MlflowClient(server).set_model_version_tag(LEGACY, version, key, value)  # its lineage tags
    return f"models:/{LEGACY}/{version}"


def test_a_version_without_the_record_asks_for_its_profile_in_one_line(legacy, trained_sd15, lake, tmp_path, capsys):
    from PIL import Image

    from pea.cli import main

    draw = ["generate", "--model-uri", legacy, "--prompt", "左边有一个红色的圆形", "--steps", "2", "--size", "32",
            "--out", str(tmp_path / "a.png")]
    for command in (draw, ["eval", "--model-uri", legacy, "--pairs", str(trained_sd15.pairs)]):
        with pytest.raises(SystemExit) as refused:
            main(command)
        err = capsys.readouterr().err
        assert refused.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{legacy} (version 1) was registered before versions recorded their generation settings" in err
        assert "pass the --profile it was trained with" in err
    main(draw + ["--profile", "embedded"])  # as before the record: the profile's settings, the lineage's models
    assert Image.open(tmp_path / "a.png").size == (32, 32)


def test_pea_generate_draws_with_a_registered_version_and_the_safety_checker_is_a_flag(cycle, zoo_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    from PIL import Image

    from pea.cli import main

    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "zoo").symlink_to(zoo_dir)
    monkeypatch.setenv("PEA_LAKE", str(lake))
    args = ["generate", "--language", "zh", "--profile", "embedded", "--model-uri", "models:/pea-adapter-zh/1",
            "--prompt", "左边有一个红色的圆形", "--steps", "2", "--size", "32", "--out", str(tmp_path / "a.png")]
    main(args)
    assert Image.open(tmp_path / "a.png").size == (32, 32) and "models:/pea-adapter-zh/1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # the zoo's teacher has none: named, not silently dropped
        main(args + ["--safety-checker"])
    assert refused.value.code == 1
    assert re.search(r"teacher .*sd15-teacher ships no safety_checker.*--no-safety-checker", capsys.readouterr().err)


def test_promotion_names_both_teacher_commits_when_they_differ(cycle, trained_sd15, server):
    spec = quick_spec(trained_sd15.spec)
    pinned = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"id": "org/teacher",
                                                                                "revision": "0" * 40})})
    won, tags = registry.promote(pinned, cycle["blend"][1], "pea-adapter-zh", "1", trained_sd15.adapter_dir,
                                 MlflowClient(server))
    assert not won and tags["promotion.decision"] == "refused"
    assert f"at None, this version for org/teacher at {'0' * 40}" in tags["promotion.reason"]


# --- idempotent registration: kill -9, a server down, a server slow (issue #18) ------------------------------------

NAME = "pea-adapter-zh"
LEGACY = "pea-adapter-zh-legacy"
SECRET = "s3cr3t-pw"
CREATE = "/api/2.0/mlflow/model-versions/create"


def _again(cycle, trained, run_dir: Path):
    """Register-ready arguments for a new training run (its own key) with the trained weights: the trained variant's
    evaluation holds for them, so nothing is evaluated again."""
    _, evaluation, spec, _ = cycle["trained"]
    return spec, dataclasses.replace(trained.result, run_dir=run_dir), evaluation


def _state(client: MlflowClient, key: str) -> tuple[list, list]:
    """The key's runs (deleted or not) and their model versions, read whole; an observer that changes nothing."""
    experiment = client.get_experiment_by_name("pea-zh")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{KEY_TAG}` = '{key}'", run_view_type=ViewType.ALL)
    if not runs:
        return runs, []
    ids = ", ".join(f"'{r.info.run_id}'" for r in runs)
    found = client.search_model_versions(f"name = '{NAME}' and run_id IN ({ids})")
    return runs, sorted((client.get_model_version(NAME, v.version) for v in found), key=lambda v: int(v.version))


def _totals(client: MlflowClient) -> tuple[int, int]:
    experiment = client.get_experiment_by_name("pea-zh")
    return (len(client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)),
            len(client.search_model_versions(f"name = '{NAME}'")))


def _assert_finished(client: MlflowClient, reg: registry.Registration, key: str, clean: registry.Registration) -> None:
    """One version for the key, READY, with every tag a clean registration leaves (`clean`'s), marked complete, its
    aliases as reg says, and reg what MLflow holds."""
    _, versions = _state(client, key)
    assert [v.version for v in versions] == [reg.version], [(v.version, v.run_id) for v in versions]
    version = versions[0]
    assert version.status == "READY" and version.run_id == reg.run_id and version.tags["run_id"] == reg.run_id
    assert version.tags[STATE_TAG] == COMPLETE
    assert version.description.startswith(f"# {NAME} v{reg.version}: ")  # its card, written before completion
    assert set(version.tags) == set(client.get_model_version(NAME, clean.version).tags)
    assert reg.promotion == promotion_tags(version.tags) and reg.promotion.keys() == clean.promotion.keys()
    assert client.get_model_version_by_alias(NAME, "challenger").version == reg.version
    assert (client.get_model_version_by_alias(NAME, "champion").version == reg.version) == reg.champion
    assert reg.champion == (reg.promotion["promotion.decision"] == "promoted")
    assert client.get_run(reg.run_id).info.status == "FINISHED"


# Run in a child process that SIGKILLs itself at `point` of a registration.
KILLED_CHILD = """
import json, os, signal, sys
from mlflow import MlflowClient
from pea import registry
from pea.registry.registration import STATE_TAG
from pea.io.results import decode
from pea.spec import LanguageSpec

args = json.loads(open(sys.argv[1], encoding="utf-8").read())  # JSON, not a pickle: nothing to execute
spec = LanguageSpec.model_validate_json(args["spec"])
result, evaluation, pairs, point = decode(args["rest"])
create, set_tag = MlflowClient._create_model_version, MlflowClient.set_model_version_tag

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def create_then_die(self, *args, **kwargs):
    if point == "before_create":
        die()
    create(self, *args, **kwargs)
    die()

def die_before_complete(self, name, version, key, value):
    if key == STATE_TAG:
        die()
    set_tag(self, name, version, key, value)

if point == "before_complete":
    MlflowClient.set_model_version_tag = die_before_complete
else:
    MlflowClient._create_model_version = create_then_die
registry.register(spec, result, evaluation, [], pairs)
print("registered: the kill point was never reached")
"""


@pytest.mark.parametrize("point", ["before_create", "after_create", "before_complete"])
def test_a_registration_killed_at_any_point_is_finished_by_a_rerun(point, cycle, trained_sd15, server, tmp_path):
    client = MlflowClient(server)
    spec, result, evaluation = _again(cycle, trained_sd15, tmp_path / f"killed-{point}")
    key = registration_key(result.run_dir, result.adapter_dir)
    champion_before = client.get_model_version_by_alias(NAME, "champion").version
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"spec": spec.model_dump_json(),
                                "rest": encode((result, evaluation, trained_sd15.pairs, point))}), encoding="utf-8")
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(args)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-3000:]

    runs, versions = _state(client, key)
    # What the kill left: the run ends (FINISHED) once log_model returns, so before_complete finds it ended.
    assert len(runs) == 1 and runs[0].info.status == ("FINISHED" if point == "before_complete" else "RUNNING")
    if point == "before_create":  # the run fully logged, no version
        assert versions == []
    elif point == "after_create":  # a version with none of pea's tags and no alias
        assert len(versions) == 1 and not versions[0].aliases and "run_id" not in versions[0].tags
    else:  # the decision recorded, the aliases set, completion not marked
        tags = versions[0].tags
        assert len(versions) == 1 and STATE_TAG not in tags and "challenger" in versions[0].aliases
        assert ("champion" in versions[0].aliases) == (tags["promotion.decision"] == "promoted")

    reg = registry.register(spec, result, evaluation, [], trained_sd15.pairs)
    _assert_finished(client, reg, key, clean=cycle["trained"][0])
    # Compared with the champion a clean registration would have faced, not with itself.
    assert reg.promotion["promotion.champion_version"] == champion_before
    assert float(reg.promotion["promotion.challenger"]) == pytest.approx(evaluation.relative_error["trained"],
                                                                        rel=1e-4)
    if point == "before_create":  # the versionless run is marked KILLED, a new one holds the version
        assert reg.run_id != runs[0].info.run_id and client.get_run(runs[0].info.run_id).info.status == "KILLED"
    else:  # finished, not registered again
        assert (reg.run_id, reg.version) == (runs[0].info.run_id, versions[0].version)

    before = _totals(client)
    assert registry.register(spec, result, evaluation, [], trained_sd15.pairs) == reg
    assert _totals(client) == before


def test_a_completed_registration_rerun_returns_it_and_creates_nothing(cycle, trained_sd15, server):
    client = MlflowClient(server)
    reg, evaluation, spec, result = cycle["trained"]
    before = _totals(client)
    assert registry.register(spec, result, evaluation, [trained_sd15.pairs], trained_sd15.pairs) == reg
    assert _totals(client) == before


def test_two_finished_versions_for_one_training_run_are_refused_by_name(cycle, trained_sd15, server):
    """Not something pea makes: a second complete version of the same run (by hand, say). Neither is deleted;
    registration names both and says what to do."""
    client = MlflowClient(server)
    reg, evaluation, spec, result = cycle["worse"]
    source = client.get_model_version(NAME, reg.version).source  # models:/<logged model id>
    extra = client.create_model_version(NAME, source, run_id=reg.run_id, tags={STATE_TAG: COMPLETE},
                                        model_id=source.removeprefix("models:/")).version
    try:
        with pytest.raises(ValueError, match="has 2 model versions") as raised:
            registry.register(spec, result, evaluation, [], trained_sd15.pairs)
        assert f"{NAME}/{reg.version} (run {reg.run_id}" in str(raised.value)
        assert f"{NAME}/{extra} (run {reg.run_id}" in str(raised.value) and "delete the others" in str(raised.value)
        assert client.get_model_version(NAME, extra).status == "READY"  # nothing deleted
    finally:
        client.delete_model_version(NAME, extra)


@pytest.fixture
def elsewhere(server, monkeypatch):
    """For a test that points registration at another tracking URI: register sets MLflow's process-global URI, put
    back to the module's server afterwards."""
    yield monkeypatch
    mlflow.set_tracking_uri(server)


def test_a_dead_server_fails_within_the_bound_naming_the_masked_uri_and_the_fix(cycle, trained_sd15, tmp_path,
                                                                                elsewhere):
    for name in HTTP_DEFAULTS:  # pea's defaults, not the module's (set first, so that undo restores what was there)
        elsewhere.setenv(name, "0")
        elsewhere.delenv(name)
    elsewhere.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@127.0.0.1:{free_port()}")  # nothing listens
    spec, result, evaluation = _again(cycle, trained_sd15, tmp_path / "down")
    started = time.monotonic()
    with pytest.raises(MlflowException) as raised:
        registry.register(spec, result, evaluation, [], trained_sd15.pairs)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    print(f"dead server: failed after {elapsed:.1f} s (backoff bound {backoff_s():.0f} s): {message}")
    assert "alice:***@127.0.0.1" in message and "did not answer" in message, message
    assert "Start the server, or point MLFLOW_TRACKING_URI at a running one" in message and "rerun" in message
    assert SECRET not in "".join(traceback.format_exception(raised.value))  # the chained causes too
    # Every retry was made, with its backoff: urllib3 sleeps 0, then 4 and 8 s (+ up to 1 s jitter each).
    assert 12 <= elapsed < backoff_s() + 20


class _Proxy(ThreadingHTTPServer):
    daemon_threads, block_on_close = True, False


@contextmanager
def _slow_proxy(target: str, delay_s: float, times: int):
    """A reverse proxy on 127.0.0.1 in front of `target` that forwards every request at once, and holds back the
    answer to the first `times` create_model_version requests by `delay_s`: the server has created the version,
    the client sees a server too slow to answer. Yields (base URL with a password, {path: requests seen})."""
    host, port = urlsplit(target).hostname, urlsplit(target).port
    seen: dict[str, int] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self) -> None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "connection", "keep-alive", "transfer-encoding", "content-length")}
            upstream = http.client.HTTPConnection(host, port, timeout=120)
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            upstream.close()
            path = urlsplit(self.path).path
            with lock:
                seen[path] = seen.get(path, 0) + 1
                held = path == CREATE and seen[path] <= times
            if held:
                time.sleep(delay_s)
            try:
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args) -> None:
            pass

    proxy = _Proxy(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://alice:{SECRET}@127.0.0.1:{proxy.server_address[1]}", seen
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_slow_create_retried_by_mlflow_leaves_one_version(cycle, trained_sd15, server, tmp_path, elsewhere, caplog):
    """The first create_model_version answer comes after the client's timeout: MLflow's client POSTs it again, and
    the server has made two versions for one run. Registration keeps the one it was answered with."""
    client = MlflowClient(server)
    spec, result, evaluation = _again(cycle, trained_sd15, tmp_path / "slow")
    key = registration_key(result.run_dir, result.adapter_dir)
    caplog.set_level(logging.WARNING, logger="pea.registry.registration")
    elsewhere.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    elsewhere.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    with _slow_proxy(server, delay_s=8, times=1) as (uri, seen):
        elsewhere.setenv("MLFLOW_TRACKING_URI", uri)
        reg = registry.register(spec, result, evaluation, [], trained_sd15.pairs)
    assert seen[CREATE] == 2  # the POST went twice
    duplicate = str(int(reg.version) - 1)
    assert f"deleted model version {NAME}/{duplicate}: a duplicate of version {reg.version}" in caplog.text
    with pytest.raises(MlflowException, match="not found|RESOURCE_DOES_NOT_EXIST"):
        client.get_model_version(NAME, duplicate)
    _assert_finished(client, reg, key, clean=cycle["trained"][0])


def test_a_server_too_slow_for_create_fails_clearly_and_the_rerun_keeps_one_version(cycle, trained_sd15, server,
                                                                                    tmp_path, elsewhere, caplog):
    """Every create_model_version answer comes too late: registration fails naming the masked URI, leaving two
    versions (one per POST), neither aliased nor complete; a rerun against the healthy server deletes one and
    finishes the other."""
    client = MlflowClient(server)
    spec, result, evaluation = _again(cycle, trained_sd15, tmp_path / "too-slow")
    key = registration_key(result.run_dir, result.adapter_dir)
    caplog.set_level(logging.WARNING, logger="pea.registry.registration")
    elsewhere.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    elsewhere.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    with _slow_proxy(server, delay_s=8, times=2) as (uri, seen):
        elsewhere.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(MlflowException) as raised:
            registry.register(spec, result, evaluation, [], trained_sd15.pairs)
        print(f"too slow: failed after {time.monotonic() - started:.1f} s")
    message = str(raised.value)
    assert "alice:***@127.0.0.1" in message and "did not answer" in message and "rerun" in message, message
    assert SECRET not in "".join(traceback.format_exception(raised.value))
    assert seen[CREATE] == 2
    runs, versions = _state(client, key)
    assert len(runs) == 1 and len(versions) == 2  # MLflow made one per POST
    assert not any(v.aliases or STATE_TAG in v.tags for v in versions)  # nothing looks complete

    elsewhere.setenv("MLFLOW_TRACKING_URI", server)
    reg = registry.register(spec, result, evaluation, [], trained_sd15.pairs)
    assert reg.version == versions[0].version
    assert (f"deleted model version {NAME}/{versions[1].version}: a duplicate of version {reg.version}"
            in caplog.text)
    _assert_finished(client, reg, key, clean=cycle["trained"][0])
