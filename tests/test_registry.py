"""The registry through a real `mlflow server` on 127.0.0.1: lineage, promotion, the pyfunc in a fresh process,
two languages registering at once, and `pea eval` on a registered version."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pea import embed, registry
from pea.adapter import PEAAdapter
from pea.corpus.synthetic import all_scenes, write_pairs
from pea.baselines import untrained_like
from pea.evaluate import evaluate
from pea.models import load_student
from pea.pipeline import prompt_kwargs
from pea.spec import load_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not come up: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    try:
        yield uri
    finally:
        patch.undo()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _quick(spec):
    """The embedded spec with two prompts per set: every figure is still computed, on fewer prompts."""
    return spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"prompts_per_set": 2,
                                                                                 "grid_prompts": 2})})


def _variant(trained, name: str, adapter: PEAAdapter, tmp: Path):
    """Register-ready (TrainResult, Evaluation) for another adapter on the same data."""
    adapter_dir = tmp / name / "adapter"
    adapter.save_pretrained(adapter_dir)
    result = dataclasses.replace(trained.result, adapter_dir=adapter_dir, run_dir=tmp / name)
    spec = _quick(trained.spec)
    return spec, result, evaluate(spec, trained.pairs, trained.embedded, adapter_dir, tmp / name / "evaluation")


@pytest.fixture(scope="module")
def cycle(server, trained_sd15, tmp_path_factory):
    """Three versions of zh, weights blended between the initialisation and the trained adapter: half way (first:
    champion), 15 % of the way (worse than the champion, better than untrained: refused as a regression), the
    trained adapter (better: promoted)."""
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
        spec, result, evaluation = _variant(t, name, adapter, tmp)
        registered[name] = (registry.register(spec, result, evaluation, [t.pairs], t.pairs), evaluation)
    return registered


def test_every_version_carries_lineage_and_evaluation_tags(cycle, trained_sd15, server):
    reg, evaluation = cycle["trained"]
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
    assert [m.step for m in client.get_metric_history(reg.run_id, "train/loss")] == list(
        range(1, trained_sd15.result.steps + 1))


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
    ja = _quick(load_spec("ja", "embedded", zoo_dir=zoo_dir))

    pairs = write_pairs(lake, ja, all_scenes())
    stores = embed.embed(ja, lake, pairs)
    # ja: an untrained adapter for its own student (registered, never promoted); zh: a copy of the trained one
    # under a fresh language code would be a lie, so zh registers its trained adapter again (version 4).
    ja_dir = lake / "ja-run" / "adapter"
    torch.manual_seed(0)
    PEAAdapter(**{k: v for k, v in PEAAdapter.load_config(t.adapter_dir).items() if not k.startswith("_")}
               ).save_pretrained(ja_dir)
    ja_eval = evaluate(ja, pairs, stores, ja_dir, lake / "ja-run" / "evaluation")
    ja_result = dataclasses.replace(t.result, adapter_dir=ja_dir, run_dir=lake / "ja-run")
    zh_spec, zh_result, zh_eval = _variant(t, "zh-again", PEAAdapter.from_pretrained(t.adapter_dir),
                                          tmp_path_factory.mktemp("zh"))
    barrier = threading.Barrier(2)

    def run(args):
        barrier.wait(timeout=60)
        return registry.register(*args)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, (zh_spec, zh_result, zh_eval, [], t.pairs)),
                   pool.submit(run, (ja, ja_result, ja_eval, [], pairs))]
        zh_reg, ja_reg = (f.result(timeout=300) for f in futures)
    client = MlflowClient(server)
    assert (ja_reg.name, ja_reg.version) == ("pea-adapter-ja", "1")
    assert zh_reg.name == "pea-adapter-zh" and int(zh_reg.version) >= 2
    for reg, language, data in ((zh_reg, "zh", t.pairs), (ja_reg, "ja", pairs)):
        tags = client.get_model_version(reg.name, reg.version).tags
        assert tags["language"] == language and tags["run_id"] == reg.run_id
        assert tags["data_fingerprint"] == registry.data_fingerprint(data)
        run = client.get_run(reg.run_id)
        assert client.get_experiment(run.info.experiment_id).name == f"pea-{language}"
        assert run.data.params["language"] == language
        assert client.get_model_version_by_alias(reg.name, "challenger").version == reg.version
    assert not ja_reg.champion and "untrained" in ja_reg.promotion["promotion.reason"]


def test_pea_eval_prints_the_table_for_a_registered_version(cycle, trained_sd15, zoo_dir, tmp_path, monkeypatch,
                                                           capsys):
    from pea.cli import main

    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "zoo").symlink_to(zoo_dir)  # the embedded profile names models under <lake>/zoo
    monkeypatch.setenv("PEA_LAKE", str(lake))
    main(["eval", "--language", "zh", "--profile", "embedded", "--model-uri", "models:/pea-adapter-zh/1",
          "--pairs", str(trained_sd15.pairs), "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "models:/pea-adapter-zh/1 (version 1)" in out
    assert all(s in out for s in ("teacher_en", "trained", "untrained", "linear_map", "clip_culture"))
    assert (tmp_path / "eval" / "grid-general.png").is_file()
    with pytest.raises(SystemExit, match="not in the registry"):
        main(["eval", "--language", "zh", "--profile", "embedded", "--model-uri", "models:/pea-adapter-zh/99",
              "--pairs", str(trained_sd15.pairs)])


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
    with pytest.raises(ValueError, match=r"teacher .*sd15-teacher ships no safety_checker.*--no-safety-checker"):
        main(args + ["--safety-checker"])  # the zoo's teacher has none: named, not silently dropped


def test_promotion_names_both_teacher_commits_when_they_differ(cycle, trained_sd15, server):
    spec = _quick(trained_sd15.spec)
    pinned = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"id": "org/teacher",
                                                                                "revision": "0" * 40})})
    won, tags = registry.promote(pinned, cycle["blend"][1], "pea-adapter-zh", "1", trained_sd15.adapter_dir,
                                 MlflowClient(server))
    assert not won and tags["promotion.decision"] == "refused"
    assert f"at None, this version for org/teacher at {'0' * 40}" in tags["promotion.reason"]
