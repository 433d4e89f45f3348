"""Spec discovery: the scan starts nothing for a dropped-in spec that names a path or model source outside the
project, the lake and the allowed roots, reports it with its file and field, and goes on with the others."""

import shutil
from pathlib import Path

import pytest
import yaml

from pea import ops
from pea.spec import ManifestSpec, available_languages, load_spec
from pea.spec.discovery import problems

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project home with zh.yaml as shipped plus two hostile specs, its own lake and MLflow store."""
    home = tmp_path / "home"
    shutil.copytree(REPO / "data" / "profiles", home / "data" / "profiles")
    (home / "data" / "languages").mkdir(parents=True)
    shutil.copy(REPO / "data" / "languages" / "zh.yaml", home / "data" / "languages" / "zh.yaml")
    zh = yaml.safe_load((REPO / "data" / "languages" / "zh.yaml").read_text())
    outside = tmp_path / "elsewhere" / "model"
    outside.mkdir(parents=True)
    hostile = {
        "xa": {**zh, "language": "xa", "corpus": {**zh["corpus"], "manifests": ["/etc/passwd"]}},
        "xb": {**zh, "language": "xb", "teacher": {**zh["teacher"], "id": str(outside), "revision": None}},
    }
    for code, spec in hostile.items():
        (home / "data" / "languages" / f"{code}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    monkeypatch.setenv("PEA_HOME", str(home))
    monkeypatch.setenv("PEA_LAKE", str(tmp_path / "lake"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("PEA_ALLOWED_ROOTS", raising=False)
    monkeypatch.delenv("PEA_ALLOWED_MODELS", raising=False)
    return home, outside


def test_the_scan_refuses_hostile_specs_by_file_and_field_and_goes_on_with_the_rest(project):
    home, outside = project
    scan = ops.due_languages(None)
    assert [d.language for d in scan.due] == ["zh"]  # the valid one is still started
    assert sorted(scan.invalid) == ["xa", "xb"]
    xa, xb = scan.invalid["xa"], scan.invalid["xb"]
    assert f"{home}/data/languages/xa.yaml names sources" in xa and "nothing was started" in xa
    assert "corpus.manifests[0].path: /etc/passwd is outside the project" in xa and "PEA_ALLOWED_ROOTS" in xa
    assert f"teacher.id: {outside} is outside the project" in xb
    assert "student.id" not in xb  # the allowed Hub id of zh.yaml is not reported


def test_allowed_roots_and_model_patterns_come_from_the_workers_environment(project, monkeypatch):
    home, outside = project
    monkeypatch.setenv("PEA_ALLOWED_ROOTS", str(outside.parent))
    assert "xb" not in ops.due_languages(None, ["xb"]).invalid
    monkeypatch.setenv("PEA_ALLOWED_MODELS", "stable-diffusion-v1-5/*, BAAI/*")  # not the zh student's org
    refused = ops.due_languages(None, ["zh"]).invalid["zh"]
    assert "student.id: Hugging Face model 'OFA-Sys/chinese-clip-vit-huge-patch14' matches none of the allowed " \
           "patterns stable-diffusion-v1-5/*, BAAI/*" in refused
    assert "teacher.id" not in refused and "evaluate.clip_model" not in refused


def test_other_escapes_are_named(project):
    spec = load_spec("zh", "embedded")
    corpus = spec.corpus.model_copy(update={"manifests": [ManifestSpec(path=p) for p in (
        "file:///etc/shadow", "memory://x.parquet", "simplecache::s3://b/x.parquet", "http://169.254.169.254/m.csv",
        "data/../../../etc/passwd", "s3://bucket/zh.parquet", "http://127.0.0.1:8000/zh.csv")]})  # last two: fine
    found = problems(spec.model_copy(update={"corpus": corpus, "train": spec.train.model_copy(update={
        "launcher": spec.train.launcher.model_copy(update={"hostfile": "/etc/hosts"})})}))
    assert [f.split(":", 1)[0] for f in found] == [f"corpus.manifests[{i}].path" for i in range(5)] + \
        ["train.launcher.hostfile"]
    assert "/etc/shadow is outside" in found[0] and "scheme 'memory'" in found[1] and "chains" in found[2]
    assert "169.254.169.254 is a link-local address" in found[3] and "/etc/passwd is outside" in found[4]


@pytest.mark.parametrize("language", available_languages(REPO / "data" / "languages"))
def test_every_shipped_spec_passes_as_shipped_and_embedded(language):
    assert problems(load_spec(language)) == [] and problems(load_spec(language, "embedded")) == []


def test_a_run_the_scan_started_checks_the_spec_again_when_it_loads_it(project):
    # The scan passed xa once; the YAML is what the run reads, whenever it starts. Only the scan's tag triggers it:
    # a run someone starts by hand is not a discovered spec.
    from prefect import flow, tags
    from prefect.testing.utilities import prefect_test_harness

    from flows.pea_flow import load_language
    from pea.spec import SpecError
    from pea.spec.discovery import SCAN_TAG

    @flow
    def load(language: str) -> str:
        return load_language(language, None, {}).language

    with prefect_test_harness(server_startup_timeout=180):
        assert load("xa") == "xa"
        with tags(SCAN_TAG), pytest.raises(SpecError, match=r"xa.yaml \(run started by the scan\) names sources"):
            load("xa")
        with tags(SCAN_TAG):
            assert load("zh") == "zh"


def test_a_remote_manifest_whose_host_resolves_to_a_private_address_is_refused(zoo_dir, tmp_path, monkeypatch):
    # A name, not a literal address, so discovery could not judge it; reading it resolves it first. "localhost"
    # resolves to loopback without any DNS; nothing listens on the port and nothing is sent.
    from pea.corpus.manifest import prepare_url_list

    monkeypatch.setenv("PEA_LAKE", str(tmp_path / "lake"))
    spec = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    url = "http://localhost:9/zh.parquet"
    spec = spec.model_copy(update={"corpus": spec.corpus.model_copy(update={
        "synthetic": None, "allow_networks": [], "manifests": [ManifestSpec(path=url)]})})
    with pytest.raises(PermissionError, match=r"refused to connect to (127\.0\.0\.1|::1) \(loopback\)"):
        prepare_url_list(spec, spec.corpus.manifests, tmp_path / "urls")
    assert ops._manifest_digest(url) == "unreadable (PermissionError)"
