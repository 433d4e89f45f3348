"""What makes a registration safe to repeat: its key, the lookup of what an earlier attempt left, and the bounds
on how long MLflow's client keeps trying a server that does not answer.

Idempotency. A registration is keyed by the training run: `pea.registration_key` = `<run dir name>:<sha256 of the
adapter's files>`, set on the MLflow run when it is created. Before logging anything, registry.register looks the
key up in the language's experiment (runs with the tag, then the model versions of those runs):

  - a version tagged `pea.registry.registration=complete` (set last, after the aliases): done, returned as it is;
  - one version, not complete: an earlier attempt died after MLflow created it; it is finished (tags,
    `challenger`, promotion), never registered a second time;
  - runs without a version: an attempt died before MLflow created one; they are marked KILLED and registration
    starts afresh;
  - several versions of one run: MLflow's HTTP client retries every method, POST included, so a
    create_model_version whose response timed out can create two. The extras (never aliased, never complete)
    are deleted, each named in a log line; the same lookup runs right after every create;
  - more than one aliased or complete version, or versions of several runs: refused, listing them.

Runs of one language must not register at the same time (the flow's per-language concurrency limit): the lookup
reads, then acts, without a lock.

Bounds. MLflow reads its HTTP knobs from the environment at every request; `http_defaults` sets pea's where the
user has not (HTTP_DEFAULTS says why these), and `unreachable` turns "the server did not answer" into one error
that names the (masked) tracking URI, the bound that was spent and the fix.

A new SQLite store (the embedded default's `tracking/mlflow.db`) is made whole before anyone opens it
(`create_sqlite_store`): MLflow builds its schema in dozens of migrations committed one by one, and a kill between
two leaves a file that MLflow cannot open again ("table ... already exists"), which no rerun would get past.

Version state: `wait_ready` (a version is used only once READY) and `set_promotion_tags` (promotion.decision
written last, so a version that has it has every other promotion tag of the same decision).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from pea.io.atomic import temp_path
from pea.io.redact import redact
from pea.spec import home

log = logging.getLogger("pea.registry.registration")

KEY_TAG = "pea.registration_key"  # on the run
STATE_TAG = "pea.registry.registration"  # on the version: "complete" once every tag and alias is set
COMPLETE = "complete"

# MLflow's own knobs, set only where the user has not. MLflow's defaults (7 retries, backoff factor 2, 120 s per
# attempt) are sized to ride out a hosted backend that rate-limits for minutes; against a self-hosted server that
# is down they hold a registration for ~4 min (connection refused) to ~20 min (no answer), and the flow's task
# retries twice more on top. pea's keep one request's worst case near 2 min (bound_s): 4 attempts, sleeping
# 0, 4 and 8 s (+ up to 1 s jitter each) between them, each waiting at most 25 s for a byte, which is still ample
# for the largest request pea makes (an adapter's upload to the server, answered once the server stored it).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "25"}


def http_defaults() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _knobs() -> tuple[int, float, float, float]:
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    return (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
            MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get())


def backoff_s() -> float:
    """The most one request sleeps between its attempts under the current knobs: urllib3's Retry sleeps 0 after the
    first failure, then factor × 2^(n-1) (at most 120 s) plus up to `jitter`."""
    retries, factor, jitter, _ = _knobs()
    return sum(min(120.0, factor * 2 ** (n - 1)) + jitter for n in range(2, retries + 1))


def bound_s() -> float:
    """The longest one request to the tracking server can take before it fails: every attempt waits its timeout."""
    retries, _, _, timeout = _knobs()
    return (retries + 1) * timeout + backoff_s()


# Errors that mean the server did not answer, or answered 5xx until the retries ran out (the cause MLflow wraps).
_UNANSWERED = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)


def unreachable(err: BaseException, uri: str, started: float) -> MlflowException | None:
    """The error to raise instead of `err` when `err` says the tracking server did not answer; None otherwise."""
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen and not isinstance(cause, _UNANSWERED):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if cause is None or id(cause) in seen:
        return None
    retries, factor, _, timeout = _knobs()
    return MlflowException(
        f"the MLflow tracking server at {redact(uri)} did not answer: gave up after {time.monotonic() - started:.0f} s "
        f"(each request tried {retries + 1} times, backoff factor {factor:g} s, {timeout:g} s timeout; at most "
        f"~{bound_s():.0f} s a request: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, "
        "MLFLOW_HTTP_REQUEST_TIMEOUT). Start the server, or point MLFLOW_TRACKING_URI at a running one (unset it to "
        "use the local SQLite store under tracking/), then rerun: registration is idempotent, a rerun for the same "
        f"training run finishes what this one started and never creates a second version. Cause: {redact(str(err))}",
        error_code=TEMPORARILY_UNAVAILABLE)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def registration_key(run_dir: Path, adapter_dir: Path) -> str:
    """`<run dir name>:<sha256 over the adapter's files>`: the same training run with the same weights, whatever
    path the lake is mounted at."""
    files = sorted(p for p in Path(adapter_dir).rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"adapter folder {adapter_dir} holds no files; train again (or restore it) first")
    manifest = "\n".join(f"{p.relative_to(adapter_dir).as_posix()} {_sha256(p)}" for p in files)
    name = Path(run_dir).name
    if "'" in name or "\\" in name:  # the key goes into MLflow filter strings, quoted
        raise ValueError(f"run folder name {name!r} holds a quote or backslash; rename the run folder")
    return f"{name}:{hashlib.sha256(manifest.encode()).hexdigest()}"


@dataclass(frozen=True)
class Existing:
    """What earlier attempts of one registration left: the key's runs and its one model version (or none)."""
    runs: list[Run]
    version: ModelVersion | None

    @property
    def complete(self) -> bool:
        return self.version is not None and self.version.tags.get(STATE_TAG) == COMPLETE


def _finished(version: ModelVersion) -> bool:
    return bool(version.aliases) or version.tags.get(STATE_TAG) == COMPLETE


def find(client: MlflowClient, experiment_id: str, name: str, key: str, keep: str | None = None) -> Existing:
    """The key's runs and model version, duplicates of one run's version deleted (`keep`: the version number to keep
    among unfinished duplicates, the one the create returned; otherwise the most advanced, then the oldest)."""
    runs = list(client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{key}'", run_view_type=ViewType.ACTIVE_ONLY,
                                   max_results=1000))
    if not runs:
        return Existing([], None)
    ids = ", ".join(f"'{r.info.run_id}'" for r in runs)
    found = client.search_model_versions(f"name = '{name}' and run_id IN ({ids})")
    # Search results may lack aliases (MLflow's warning): read each version whole.
    versions = sorted((client.get_model_version(name, v.version) for v in found), key=lambda v: int(v.version))
    if len(versions) <= 1:
        return Existing(runs, versions[0] if versions else None)
    listing = "; ".join(f"{name}/{v.version} (run {v.run_id}, aliases {list(v.aliases) or 'none'}, "
                        f"{v.tags.get(STATE_TAG, 'incomplete')})" for v in versions)
    if len({v.run_id for v in versions}) > 1 or sum(map(_finished, versions)) > 1:
        # A ValueError: the flow's register task does not retry it (a person decides which version stays).
        raise ValueError(
            f"registration {key} of {name} has {len(versions)} model versions: {listing}. One training run must have "
            "one version; decide which to keep and delete the others (MlflowClient().delete_model_version), then "
            "rerun")
    kept = min(versions, key=lambda v: (not _finished(v), str(v.version) != str(keep), "run_id" not in v.tags,
                                        int(v.version)))
    for extra in versions:
        if extra.version != kept.version:
            client.delete_model_version(name, extra.version)
            log.warning("deleted model version %s/%s: a duplicate of version %s for run %s, created when MLflow's "
                        "client retried create_model_version (a POST whose answer came too late)", name,
                        extra.version, kept.version, kept.run_id)
    return Existing(runs, kept)


def abandon(client: MlflowClient, runs: list[Run], keep: str | None = None) -> None:
    """Mark the key's runs that never got a version (all but `keep`) KILLED: an attempt died before MLflow created
    its version (or the client created the run twice); a retry starts a new run."""
    for run in runs:
        if run.info.run_id != keep and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning("marked run %s KILLED: a registration attempt for %s left it without a model version",
                        run.info.run_id, run.data.tags.get(KEY_TAG))


def promotion_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k.startswith("promotion.")}


def recorded_decision(client: MlflowClient, name: str, version: str) -> tuple[bool, dict[str, str]] | None:
    """The promotion an earlier attempt recorded on `version` (its champion alias set again if that attempt died
    before setting it), as registry.promote returns it; None when there is none, or when the champion it was
    compared with is no longer the champion (then promote decides again, against the current one). registry
    writes `promotion.decision` last, so a version that has it has the whole decision."""
    promotion = promotion_tags(client.get_model_version(name, version).tags)
    if "promotion.decision" not in promotion:
        return None
    try:
        current = str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:  # no champion
        current = None
    if current not in (version, promotion.get("promotion.champion_version")):
        return None
    won = promotion["promotion.decision"] == "promoted"
    if won and current != version:
        client.set_registered_model_alias(name, "champion", version)
    return won, promotion


def wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := client.get_model_version(name, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} is {status}, not READY; see the MLflow server log")
        time.sleep(0.5)


def set_promotion_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    """Replace the version's promotion.* tags, `promotion.decision` first off and last on: a version that has one
    has all the others, from the same decision (a registration killed half way through writing them decides again)."""
    old = promotion_tags(client.get_model_version(name, version).tags)
    for stale in sorted(old.keys() - (tags.keys() - {"promotion.decision"}), key=lambda k: k != "promotion.decision"):
        client.delete_model_version_tag(name, version, stale)
    for key, value in sorted(tags.items(), key=lambda kv: kv[0] == "promotion.decision"):
        client.set_model_version_tag(name, version, key, value)


def create_sqlite_store(uri: str) -> None:
    """Where `uri` is sqlite:///<file> and the file does not exist yet: build MLflow's schema in a temp file beside
    it, then hard-link it in. A link, not a rename: a second process doing the same at once finds the name taken
    and keeps the first store, into which the first may already have written (a rename would replace it)."""
    db = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(db)  # a kill leaves only this hidden temp (atomic.sweep's kind), never a half store
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "artifacts").as_uri())  # runs the migrations
        store.engine.dispose()
        try:
            os.link(tmp, db)
        except FileExistsError:
            log.info("%s was created by another process meanwhile; using it", db)
    finally:
        tmp.unlink(missing_ok=True)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded default's SQLite store; a SQLite store is created whole first."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'tracking' / 'mlflow.db'}"
    create_sqlite_store(uri)
    return uri
