"""The `pea` flow: one language from manifest to a registered adapter. Tasks only wire pea stages.

    python -m flows.pea_flow --language zh --profile embedded     # in-process, no Prefect server
    prefect deployment run pea/train-language -p language=zh       # a deployment from prefect.yaml

Caching (docs/operations.md): acquire, filter and embed are cached across runs, keyed by the part of
the spec they read and a fingerprint of their inputs; train, evaluate and register are cached only
within one flow run (a retried run skips what it finished), so every new run trains and registers a
new version. Cached results are small frozen dataclasses of paths and numbers, written as plain JSON under
`$PEA_RESULTS` (default `<lake>/prefect-results`) and read back only through pea.io.results, which refuses a file
it did not write (never unpickled, nothing imported); the data itself stays in the lake.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Annotated, Any, Callable

from filelock import FileLock
from mlflow.exceptions import MlflowException
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.settings import get_current_settings
from pydantic import Field

from flows.summary import print_summary  # noqa: F401 (the flow module's API: main() and callers print with it)
from pea import embed as embed_stage
from pea import evaluate as evaluate_stage
from pea import ops, registry
from pea import train as train_stage
from pea.corpus import acquire as acquire_stage
from pea.corpus import filter as filter_stage
from pea.embed import launcher
from pea.io import progress, results
from pea.io.redact import mask_logging, masked_errors, redact
from pea.models.embedded import prepare_zoo
from pea.spec import (
    DIFFUSION_ONLY,
    ENGINE_ADDRESS,
    LANGUAGE_CODE,
    LanguageSpec,
    lake_root,
    load_spec,
    profiles,
)
from pea.spec.discovery import SCAN_TAG, check_sources
from pea.train import shards as shards_stage

CACHE_VERSION = 2  # bump when a stage's output format changes, so old cached results are not reused (2: pea-json)


def results_root(lake: Path) -> Path:
    """Where Prefect persists task results (pea-json, pea.io.results): $PEA_RESULTS or <lake>/prefect-results."""
    return Path(os.environ.get("PEA_RESULTS") or Path(lake) / "prefect-results").resolve()


def _digest(stage: str, **parts: Any) -> str:
    text = json.dumps({"stage": stage, "cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return f"pea-{stage}-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _dump(model) -> Any:
    return model.model_dump(mode="json") if model is not None else None


# --- cache keys: (task run context, task parameters) -> key ---------------------------------------------------

def _acquire_key(_: TaskRunContext, p: dict[str, Any]) -> str:
    spec: LanguageSpec = p["spec"]
    # Where it runs (corpus.engine) changes how, not what: the same shards with or without a cluster.
    return _digest("acquire", lake=p["lake"], language=spec.language,
                   corpus=spec.corpus.model_dump(mode="json", exclude={"engine"}),
                   captions=_dump(spec.synthetic_captions), manifests=ops.manifests_fingerprint(spec))


def _filter_key(_: TaskRunContext, p: dict[str, Any]) -> str:
    spec: LanguageSpec = p["spec"]
    raw = Path(p["lake"]) / spec.language / "raw"
    return _digest("filter", lake=p["lake"], language=spec.language, filter=_dump(spec.filter),
                   raw=ops.files_fingerprint(raw, ["*_stats.json", "*.parquet"]))


def _embed_key(_: TaskRunContext, p: dict[str, Any]) -> str:
    spec: LanguageSpec = p["spec"]
    # The worker layout changes how, not what: the same stores whatever embed.launcher says. The pairs' fingerprint is
    # scanned once a process (pea.train.shards.fingerprint): pack, train, evaluate and register reuse it.
    return _digest("embed", lake=p["lake"], stores=embed_stage.store_keys(spec),
                   embed=spec.embed.model_dump(mode="json", exclude={"launcher"}),
                   data=shards_stage.fingerprint(p["pairs"]))


def _pack_key(_: TaskRunContext, p: dict[str, Any]) -> str:
    return _digest("pack", key=shards_stage.pack_key(p["spec"], p["pairs"], p["embedded"]))


def _per_flow_run_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
        return _digest(stage, flow_run=ctx.task_run.flow_run_id, spec=_dump(p["spec"]))
    return key


# Failures a retry can fix: the network, a download that stopped short (acquire's RuntimeError names the missing
# shards), a busy registry ("database is locked"). Not retried: a bad spec or manifest (ValueError,
# FileNotFoundError), a programming error (AttributeError, TypeError, ...).
TRANSIENT = (ConnectionError, TimeoutError, OSError, RuntimeError, MlflowException, sqlite3.OperationalError)
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, NotImplementedError)


def _transient(task_, task_run, state) -> bool:
    return isinstance(state.data, TRANSIENT) and not isinstance(state.data, PERMANENT)


# --- tasks: one per stage -------------------------------------------------------------------------------------

@task(retries=0)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def load_language(language: str, profile: str | None, overrides: dict[str, dict[str, Any]]) -> LanguageSpec:
    """Load and validate the spec, then apply the run's overrides (validated again, never retried). A run the scan
    started checks the spec's sources again (pea.spec.discovery): the YAML may have changed since the scan read it."""
    spec = ops.with_overrides(load_spec(language, profile), **overrides)
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None and SCAN_TAG in (context.flow_run.tags or []):
        check_sources(spec, f"data/languages/{language}.yaml (run started by the scan)")
    return spec


@task
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def build_zoo(spec: LanguageSpec) -> dict[str, Path]:
    return prepare_zoo(image_size=spec.corpus.image_size)


@task
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def build_full_size(spec: LanguageSpec) -> dict[str, Path]:
    """Profile fullsize: the real architectures with random weights (pea.models.fullsize), built once."""
    from pea.models import fullsize

    return fullsize.prepare(spec)


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient, cache_key_fn=_acquire_key,
      persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def acquire(spec: LanguageSpec, lake: Path) -> acquire_stage.AcquireResult:
    return acquire_stage.acquire(spec, lake)


@task(cache_key_fn=_filter_key, persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def filter_pairs(spec: LanguageSpec, lake: Path) -> filter_stage.FilterResult:
    return filter_stage.filter_pairs(spec, lake)


@task(cache_key_fn=_embed_key, persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def embed(spec: LanguageSpec, lake: Path, pairs: Path) -> embed_stage.EmbedResult:
    # In this process for one worker; under the deepspeed launcher for spec embed.launcher's workers.
    return embed_stage.launch(spec, lake, pairs)


@task(cache_key_fn=_pack_key, persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def pack(spec: LanguageSpec, pairs: Path, embedded: embed_stage.EmbedResult) -> shards_stage.Packed:
    """Join the pairs with their tensors into the training shards every rank streams (and the held-out sample)."""
    return shards_stage.pack(spec, pairs, embedded)


@task(cache_key_fn=_per_flow_run_key("train"), persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def train(spec: LanguageSpec, pairs: Path, embedded: embed_stage.EmbedResult, run_dir: Path) -> train_stage.TrainResult:
    # In this process for one process; under the deepspeed launcher for spec train.launcher's processes/nodes.
    return train_stage.launch(spec, pairs, embedded, run_dir)


@task(cache_key_fn=_per_flow_run_key("train_diffusion_only"), persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def train_diffusion_only(spec: LanguageSpec, pairs: Path, embedded: embed_stage.EmbedResult,
                         run_dir: Path) -> train_stage.TrainResult:
    """The table's diffusion-loss-only baseline (evaluate.diffusion_only_baseline): same adapter, data and steps,
    nothing from the teacher (pea.spec.DIFFUSION_ONLY), the same process layout (train.launcher) and launch."""
    return train_stage.launch(ops.with_overrides(spec, train=DIFFUSION_ONLY), pairs, embedded, run_dir)


@task(cache_key_fn=_per_flow_run_key("evaluate"), persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def evaluate(spec: LanguageSpec, pairs: Path, embedded: embed_stage.EmbedResult, trained: train_stage.TrainResult,
             baselines: dict[str, Path]) -> evaluate_stage.Evaluation:
    return evaluate_stage.evaluate(spec, pairs, embedded, trained.adapter_dir, trained.run_dir / "evaluation",
                                   baselines)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      cache_key_fn=_per_flow_run_key("register"), persist_result=True)
@masked_errors()  # Prefect logs and stores the error's message: masked first (pea.io.redact)
def register(spec: LanguageSpec, trained: train_stage.TrainResult, evaluation: evaluate_stage.Evaluation,
             filtered: filter_stage.FilterResult) -> registry.Registration:
    result = registry.register(spec, trained, evaluation, [filtered.report_path, *filtered.histograms.values()],
                               filtered.pairs_path)
    ops.tag_sources(result, spec)
    return result


# --- wiring ---------------------------------------------------------------------------------------------------

def _missing_outputs(result: Any) -> list[str]:
    """Paths a (cached) stage result points at that are gone from the lake."""
    missing = [str(v) for f in dataclasses.fields(result) if isinstance(v := getattr(result, f.name), Path)
               and not v.exists()]
    if isinstance(result, acquire_stage.AcquireResult) and not missing:
        complete = len(list(result.raw_dir.glob("*_stats.json")))
        if complete < result.shards_total:
            missing.append(f"{result.shards_total - complete} of {result.shards_total} shards in {result.raw_dir}")
    return missing


def _run(stage, *args, refresh: bool, cached: list[str]):
    """Call a task on this thread; a cached result whose files are gone is recomputed."""
    state = (stage.with_options(refresh_cache=True) if refresh else stage)(*args, return_state=True)
    result = state.result()  # raises the stage's error: the flow run fails with its message
    if state.name == "Cached":
        if missing := _missing_outputs(result):
            print(f"{stage.name}: the cached result refers to missing {', '.join(missing)}; running the stage again")
            result = stage.with_options(refresh_cache=True)(*args, return_state=True).result()
        else:
            cached.append(stage.name)
    return result


def _run_dir(lake: Path, language: str) -> Path:
    """lake/<lang>/runs/<created>-<flow run id>: fixed for one flow run, so a retried run resumes its checkpoints."""
    ctx = FlowRunContext.get()
    run = ctx.flow_run
    return lake / language / "runs" / f"{run.created:%Y%m%d-%H%M%S}-{str(run.id)[:8]}"


def _runs_at_once() -> int | None:
    """The concurrency limit of the work pool this run came from (None: in-process, or a pool without one)."""
    context = FlowRunContext.get()
    pool = context.flow_run.work_pool_name if context is not None and context.flow_run is not None else None
    if pool is None:
        return None
    with get_client(sync_client=True) as client:
        return client.read_work_pool(pool).concurrency_limit


def run_overrides(steps: int | None, micro_batch_size: int | None,
                  engine_address: str | None) -> dict[str, dict[str, Any]]:
    """The flow's parameters as overrides of spec sections (pea.ops.with_overrides)."""
    train = {k: v for k, v in {"steps": steps, "micro_batch_size": micro_batch_size}.items() if v is not None}
    return {"train": train, "corpus": {"engine": {"kind": "ray", "address": engine_address}} if engine_address else {}}


def language_limit(language: str) -> str:
    return f"pea-train-{language}"


@contextlib.contextmanager
def one_run_of(language: str, lake: Path):
    """Held while this run works: another run of `language` waits for it. On a Prefect server, the server's
    concurrency limit, with a 60 s lease the run renews (a run killed with -9 holds the slot a minute: the server
    revokes expired leases). Without one (the embedded default's temporary server runs no lease revoker, so a killed
    run would hold the slot for good), a lock on a file in the lake, which the kernel releases with the process."""
    if get_current_settings().api.url:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(language_limit(language), 1)
        held = concurrency(language_limit(language), occupy=1, strict=True, lease_duration=60)
        where = f"concurrency limit {language_limit(language)!r}"
    else:
        (lake / language).mkdir(parents=True, exist_ok=True)
        held = FileLock(lake / language / ".run.lock")
        where = f"lock {lake / language / '.run.lock'}"
    print(f"waiting for any other run of {language} to finish ({where})")
    with held:
        yield


@flow(name="pea", log_prints=True, retries=0)
def pea(language: Annotated[str, Field(pattern=LANGUAGE_CODE.pattern, description="a spec in data/languages/")],
        profile: str | None = None,
        steps: Annotated[int, Field(ge=1, description="training steps (spec train.steps)")] | None = None,
        micro_batch_size: Annotated[int, Field(ge=1, description="spec train.micro_batch_size")] | None = None,
        engine_address: Annotated[str, Field(pattern=f"^(?:{ENGINE_ADDRESS.pattern})$", description=(
            "Ray address for acquire and filter; 'auto' or ray://head:10001"))] | None = None,
        refresh_cache: bool = False) -> dict:
    """Acquire, filter, embed, distil, evaluate and register the PEA adapter for `language`.

    `language` must have a spec in data/languages/. `profile` stacks data/profiles/ on top (e.g. 'embedded').
    `steps` and `micro_batch_size` override the spec's train section for this run; `engine_address` runs acquire
    and filter on that Ray cluster (spec corpus.engine). `refresh_cache` recomputes every stage instead of reusing
    cached results. Runs of the same language wait for each other.
    """
    progress.for_logs()
    mask_logging()  # Prefect's console and API handlers: every line this run logs, tracebacks included, is masked
    spec = load_language(language, profile, run_overrides(steps, micro_batch_size, engine_address))
    threads = launcher.thread_budget(_runs_at_once())
    launcher.apply_thread_budget(threads)
    print(f"thread budget: {threads} (PEA_THREADS, else the cores / the work pool's concurrency limit)")
    lake = lake_root()
    # JSON results, read back only through a storage that refuses files naming another serializer (pea.io.results).
    storage = results.result_storage(results_root(lake))
    stages = {t.name: results.persisted(t, storage) for t in (acquire, filter_pairs, embed, pack, train,
                                                              train_diffusion_only, evaluate, register)}
    with one_run_of(spec.language, lake):
        if "embedded" in profiles(profile):
            build_zoo(spec)
        if "fullsize" in profiles(profile):
            build_full_size(spec)
        cached: list[str] = []
        run = dict(refresh=refresh_cache, cached=cached)
        acquired = _run(stages["acquire"], spec, lake, **run)
        filtered = _run(stages["filter_pairs"], spec, lake, **run)
        create_table_artifact(
            key=f"data-quality-{spec.language}", description=f"{spec.language}: rows dropped per reason",
            table=[{"reason": k, "rows": v} for k, v in
                   {"rows in": filtered.rows_in, **filtered.dropped, "rows out": filtered.rows_out}.items()])
        embedded = _run(stages["embed"], spec, lake, filtered.pairs_path, **run)
        packed = _run(stages["pack"], spec, filtered.pairs_path, embedded, **run)
        run_dir = _run_dir(lake, spec.language)
        trained = _run(stages["train"], spec, filtered.pairs_path, embedded, run_dir, **run)
        baselines = {}
        if spec.evaluate.diffusion_only_baseline:
            baselines["diffusion_only"] = _run(stages["train_diffusion_only"], spec, filtered.pairs_path, embedded,
                                               run_dir / "diffusion-only", **run).adapter_dir
        evaluation = _run(stages["evaluate"], spec, filtered.pairs_path, embedded, trained, baselines, **run)
        create_table_artifact(key=f"evaluation-{spec.language}",
                              description=f"{spec.language}: held-out agreement with the teacher",
                              table=[{"metric": k, "value": round(v, 6)} for k, v in evaluation.metrics().items()])
        registered = _run(stages["register"], spec, trained, evaluation, filtered, **run)
    model = publish_model(spec.language, registered, cached)
    if "acquire" in cached:  # nothing was downloaded in this run
        acquired = dataclasses.replace(acquired, shards_skipped=acquired.shards_total, seconds=0.0)
    if "embed" in cached:  # nothing was computed in this run: every row came from the stores
        embedded = dataclasses.replace(
            embedded, computed={k: 0 for k in embedded.computed}, seconds=0.0,
            reused={k: embedded.computed.get(k, 0) + embedded.reused.get(k, 0) for k in embedded.computed})
    return {
        "language": spec.language,
        "cached": cached,
        "acquired": {"rows": acquired.rows, "downloaded": acquired.successes,
                     "shards_skipped": acquired.shards_skipped, "shards": acquired.shards_total,
                     "seconds": round(acquired.seconds, 1)},
        "filtered": {"rows_in": filtered.rows_in, "rows_out": filtered.rows_out, "dropped": filtered.dropped},
        "embedded": {"computed": embedded.computed, "reused": embedded.reused, "seconds": round(embedded.seconds, 1)},
        "packed": {"train_rows": packed.train.rows, "heldout_rows": packed.heldout.rows,
                   "row_groups": sum(len(g) for g in packed.train.row_groups), "root": str(packed.root)},
        "trained": {"steps": trained.steps, "final_loss": round(trained.final_loss, 5),
                    "samples_per_s": round(trained.samples_per_s, 1), "adapter": str(trained.adapter_dir)},
        "evaluation": {"heldout_pairs": evaluation.heldout_pairs,
                       **{k: round(v, 5) for k, v in evaluation.metrics().items()}},
        "table": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                  for row in evaluation.rows()],
        "grid": str(evaluation.grid),
        "world": _world(spec),
        "model": model,
    }


def _world(spec: LanguageSpec) -> str:
    synthetic = spec.corpus.synthetic
    if synthetic is None:
        return "the spec's manifests"
    return (f"synthetic corpus, {synthetic.mismatched:.0%} mismatched pairs, {synthetic.partial:.0%} partial captions, "
            f"{synthetic.culture_rows} native culture rows")


def publish_model(language: str, registered: registry.Registration, cached: list[str]) -> dict:
    """The `model-<language>` artifact and the summary's model entry. Both are shown to people: a password or
    token in the tracking URI is masked (pea.io.redact), in the links too."""
    links = ops.mlflow_links(registered)
    tracking = redact(registered.tracking_uri)
    create_markdown_artifact(
        key=f"model-{language}", description=f"{language}: registered adapter",
        markdown=f"**{registered.model_uri}** ({'champion' if registered.champion else 'challenger, not promoted'})\n\n"
                 f"- [model version]({links['model_version']})\n- [MLflow run]({links['run']}) `{registered.run_id}`\n"
                 f"- tracking: `{tracking}` ({links['ui']})\n- reused from cache: {cached or 'nothing'}")
    return {"uri": registered.model_uri, "champion": registered.champion_uri if registered.champion else None,
            "tracking_uri": tracking, "run": links["run"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the pea flow in-process (no Prefect server needed).")
    parser.add_argument("--language", required=True)
    parser.add_argument("--profile", help="e.g. 'embedded': tiny offline models and the synthetic corpus")
    parser.add_argument("--steps", type=int, help="override the spec's train.steps")
    parser.add_argument("--micro-batch-size", type=int, help="override the spec's train.micro_batch_size")
    parser.add_argument("--engine-address", help="Ray for acquire and filter: 'auto' or ray://<head>:10001")
    parser.add_argument("--refresh-cache", action="store_true", help="recompute every stage")
    args = parser.parse_args()
    from pea.cli import run_masked

    # A failed run ends in one masked line naming the error (Prefect has logged its masked traceback above it).
    raise SystemExit(run_masked("pea flow", lambda: print_summary(pea(
        args.language, args.profile, steps=args.steps, micro_batch_size=args.micro_batch_size,
        engine_address=args.engine_address, refresh_cache=args.refresh_cache))))


if __name__ == "__main__":
    main()
