"""Operations helpers for the orchestration layer: what needs (re)training, and fingerprints of inputs.

    due_languages(profile) -> Scan      # which languages in data/languages/ need a train-language run, and why
    source_fingerprint(spec) -> str      # the spec as loaded + the content of its manifests
    tag_sources(registration, spec)      # records source_fingerprint on a registered model version
    files_fingerprint(folder, patterns)  # names and sizes of files: a cheap key for "these inputs changed"
    mlflow_links(registration) -> dict   # UI links to the run and the model version
    with_overrides(spec, train={...})    # a run's overrides of spec sections, validated like the spec

Every spec is checked before it counts as due (pea.spec.discovery): it must validate and name only allowed model
sources and paths; a refused one is reported under `invalid` with the file and fields, and the rest go on.

A language is *due* when it has a spec but no model version yet, when its spec or manifests changed
since its latest version was trained (source fingerprint), or when the filtered pairs in the lake are
not the data its latest version was trained on (data fingerprint). A language whose latest version was
trained on the current sources and data but not promoted is not due: retraining would reproduce it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from pea.io.addresses import networks
from pea.io.redact import masked_errors, redact
from pea.registry import Registration, model_name, tracking_uri
from pea.spec import (
    LanguageSpec,
    SpecError,
    available_languages,
    deep_merge,
    home,
    lake_root,
    load_spec,
)
from pea.spec.discovery import check_sources
from pea.train.shards import fingerprint

SOURCE_TAG = "source_fingerprint"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_digest(location: str, allowed: tuple = ()) -> str:
    """sha256 of a local manifest; for a remote (fsspec) URL its size and ETag/modification time (an http(s) one
    only at a public address or in `allowed`, on every redirect hop: pea.corpus.remote)."""
    if "://" not in location:
        path = Path(location) if Path(location).is_absolute() else home() / location
        return _sha256_file(path) if path.is_file() else "missing"
    try:
        from pea.corpus.remote import describe, manifest_filesystem

        fs, remote = manifest_filesystem(location, allowed)
        info = describe(fs, remote, location)
        stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "Last-Modified") if info.get(k)), None)
        return f"{info.get('size')}:{stamp}"
    except Exception as err:  # unreachable or refused now: acquire will say why; the scan must not stop here
        return f"unreadable ({type(err).__name__})"


def manifests_fingerprint(spec: LanguageSpec) -> str:
    """A digest of the manifests' content (a manifest that is missing counts as 'missing': acquire names it)."""
    locations = [str(getattr(m, "path", m)) for m in spec.corpus.manifests]
    allowed = networks(spec.corpus.allow_networks)
    parts = [f"{loc}:{_manifest_digest(loc, allowed)}" for loc in locations]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def source_fingerprint(spec: LanguageSpec) -> str:
    """What a training run starts from: the whole spec (profiles and overrides applied) and the manifests."""
    data = spec.model_dump(mode="json")
    data["corpus"]["engine"] = None  # where acquire and filter ran (e.g. the flow's engine_address) is not a source
    text = json.dumps(data, sort_keys=True) + manifests_fingerprint(spec)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_overrides(spec: LanguageSpec, **sections: dict[str, Any]) -> LanguageSpec:
    """The spec with some fields of its sections replaced (e.g. train={"steps": 50}), validated again."""
    sections = {name: values for name, values in sections.items() if values}
    if not sections:
        return spec
    # Merged as plain data, deeply (corpus={"synthetic": {"mismatched": 0.3}} keeps the other synthetic fields),
    # then validated.
    data = deep_merge(spec.model_dump(), sections)
    try:
        spec = LanguageSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"overrides {sections} do not fit the {spec.language} spec: {err}") from None
    if spec.train.steps <= spec.train.warmup_steps:
        raise SpecError(f"train.steps={spec.train.steps} must be greater than train.warmup_steps="
                        f"{spec.train.warmup_steps} (the learning-rate decay needs steps after the warmup); "
                        "ask for more steps")
    return spec


def files_fingerprint(folder: Path, patterns: list[str]) -> str:
    """Names and sizes of the files matching `patterns` in `folder` (not their content: cheap for large shards)."""
    entries = sorted(f"{p.name}:{p.stat().st_size}" for pattern in patterns for p in Path(folder).glob(pattern)
                     if p.is_file())
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


@masked_errors()  # a failure names the tracking URI, which may hold a password
def tag_sources(registration: Registration, spec: LanguageSpec) -> str:
    """Record the source fingerprint on the registered version, so a later scan can tell what changed."""
    fingerprint = source_fingerprint(spec)
    client = MlflowClient(registration.tracking_uri)
    client.set_model_version_tag(registration.name, registration.version, SOURCE_TAG, fingerprint)
    return fingerprint


@masked_errors()
def mlflow_links(registration: Registration) -> dict[str, str]:
    """Links to the run and the model version in the MLflow UI (a local `mlflow ui` for a SQLite store), for
    display: credentials in the tracking URI are masked."""
    uri = registration.tracking_uri
    served = uri.startswith(("http://", "https://"))
    base = redact(uri.rstrip("/")) if served else "http://127.0.0.1:5000"
    experiment = MlflowClient(uri).get_experiment_by_name(registration.experiment)
    experiment_id = experiment.experiment_id if experiment else "0"
    return {"run": f"{base}/#/experiments/{experiment_id}/runs/{registration.run_id}",
            "model_version": f"{base}/#/models/{registration.name}/versions/{registration.version}",
            "ui": base if served else f"mlflow ui --backend-store-uri {redact(uri)}   (then open {base})"}


@dataclass(frozen=True)
class Due:
    language: str
    reason: str


@dataclass(frozen=True)
class Scan:
    due: list[Due] = field(default_factory=list)
    up_to_date: list[Due] = field(default_factory=list)  # with the reason it is not due
    invalid: dict[str, str] = field(default_factory=dict)  # language -> the SpecError's message


def _latest_version(client: MlflowClient, name: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


def _has_champion(client: MlflowClient, name: str) -> bool:
    try:
        client.get_model_version_by_alias(name, "champion")
        return True
    except MlflowException:
        return False


def check_language(spec: LanguageSpec, client: MlflowClient, lake: Path) -> tuple[bool, str]:
    """(due, why) for one language."""
    name = model_name(spec.language)
    latest = _latest_version(client, name)
    if latest is None:
        return True, f"no model version of {name} yet"
    recorded = latest.tags.get(SOURCE_TAG)
    current = source_fingerprint(spec)
    if recorded != current:
        return True, (f"spec or manifests changed since version {latest.version} "
                      f"(source fingerprint {recorded or 'not recorded'} -> {current})")
    pairs = lake / spec.language / "pairs" / "pairs.parquet"
    if pairs.is_file() and (data := fingerprint(pairs)) != latest.tags.get("data_fingerprint"):
        return True, (f"the filtered pairs in the lake changed since version {latest.version} "
                      f"(data fingerprint {latest.tags.get('data_fingerprint')} -> {data})")
    if _has_champion(client, name):
        return False, f"champion is up to date (latest version {latest.version})"
    return False, (f"no champion, but version {latest.version} was trained on the current spec and data and not "
                   "promoted; change the spec or the data, or run train-language by hand")


@masked_errors()
def due_languages(profile: str | None = None, languages: list[str] | None = None) -> Scan:
    """Check every language of data/languages/ (or `languages`) against the model registry."""
    client = MlflowClient(tracking_uri())
    lake = lake_root()
    scan = Scan()
    for language in languages if languages is not None else available_languages():
        source = home() / "data" / "languages" / f"{language}.yaml"
        try:  # a dropped-in spec runs nothing until it validates and names only allowed sources
            spec = check_sources(load_spec(language, profile), f"{source}" + (f" with profile {profile}" if profile
                                                                               else ""))
        except SpecError as err:
            scan.invalid[language] = redact(str(err))
            continue
        due, why = check_language(spec, client, lake)
        (scan.due if due else scan.up_to_date).append(Due(language, why))
    return scan
