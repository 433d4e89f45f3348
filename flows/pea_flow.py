"""The `pea` flow: one language from manifest to a registered adapter. Tasks only wire pea stages.

    python -m flows.pea_flow --language zh --profile embedded     # in-process, no Prefect server
    prefect deployment run pea/train-language -p language=zh       # a deployment from prefect.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pea import embed as embed_stage
from pea import evaluate as evaluate_stage
from pea import registry, train as train_stage
from pea.corpus import acquire as acquire_stage
from pea.corpus import filter as filter_stage
from pea.embedded import prepare_zoo
from pea.spec import LanguageSpec, lake_root, load_spec, profiles


@task
def load_language(language: str, profile: str | None) -> LanguageSpec:
    return load_spec(language, profile)


@task
def build_zoo(spec: LanguageSpec) -> dict[str, Path]:
    return prepare_zoo(image_size=spec.corpus.image_size)


@task(retries=2, retry_delay_seconds=10)
def acquire(spec: LanguageSpec, lake: Path) -> acquire_stage.AcquireResult:
    return acquire_stage.acquire(spec, lake)


@task
def filter_pairs(spec: LanguageSpec, lake: Path) -> filter_stage.FilterResult:
    result = filter_stage.filter_pairs(spec, lake)
    create_table_artifact(key=f"data-quality-{spec.language}", description="rows dropped per reason",
                          table=[{"reason": k, "rows": v} for k, v in
                                 {"rows in": result.rows_in, **result.dropped, "rows out": result.rows_out}.items()])
    return result


@task
def embed(spec: LanguageSpec, lake: Path, pairs: Path) -> embed_stage.EmbedResult:
    return embed_stage.embed(spec, lake, pairs)


@task
def train(spec: LanguageSpec, pairs: Path, embedded: embed_stage.EmbedResult, run_dir: Path) -> train_stage.TrainResult:
    return train_stage.train(spec, pairs, embedded, run_dir)


@task
def evaluate(spec: LanguageSpec, pairs: Path, embedded: embed_stage.EmbedResult,
             trained: train_stage.TrainResult) -> evaluate_stage.Evaluation:
    result = evaluate_stage.evaluate(spec, pairs, embedded, trained.adapter_dir, trained.run_dir / "evaluation")
    create_table_artifact(key=f"evaluation-{spec.language}", description="held-out agreement with the teacher",
                          table=[{"metric": k, "value": round(v, 6)} for k, v in result.metrics().items()])
    return result


@task(retries=2, retry_delay_seconds=5)
def register(spec: LanguageSpec, trained: train_stage.TrainResult, evaluation: evaluate_stage.Evaluation,
             filtered: filter_stage.FilterResult) -> registry.Registration:
    result = registry.register(spec, trained, evaluation, [filtered.report_path], filtered.pairs_path)
    create_markdown_artifact(key=f"model-{spec.language}", description="registered adapter",
                             markdown=f"`{result.model_uri}` (champion: {result.champion}), run `{result.run_id}` "
                                      f"at {result.tracking_uri}")
    return result


@flow(name="pea", log_prints=True)
def pea(language: str, profile: str | None = None) -> dict:
    """Acquire, filter, embed, distil, evaluate and register the PEA adapter for `language`."""
    spec = load_language(language, profile)
    lake = lake_root()
    if "embedded" in profiles(profile):
        build_zoo(spec)
    acquired = acquire(spec, lake)
    filtered = filter_pairs(spec, lake)
    embedded = embed(spec, lake, filtered.pairs_path)
    run_dir = lake / spec.language / "runs" / time.strftime("%Y%m%d-%H%M%S")
    trained = train(spec, filtered.pairs_path, embedded, run_dir)
    evaluation = evaluate(spec, filtered.pairs_path, embedded, trained)
    registered = register(spec, trained, evaluation, filtered)
    return {
        "language": spec.language,
        "acquired": {"rows": acquired.rows, "downloaded": acquired.successes,
                     "shards_skipped": acquired.shards_skipped, "shards": acquired.shards_total,
                     "seconds": round(acquired.seconds, 1)},
        "filtered": {"rows_in": filtered.rows_in, "rows_out": filtered.rows_out, "dropped": filtered.dropped},
        "embedded": {"computed": embedded.computed, "reused": embedded.reused, "seconds": round(embedded.seconds, 1)},
        "trained": {"steps": trained.steps, "final_loss": round(trained.final_loss, 5),
                    "samples_per_s": round(trained.samples_per_s, 1), "adapter": str(trained.adapter_dir)},
        "evaluation": {"heldout_pairs": evaluation.heldout_pairs,
                       **{k: round(v, 5) for k, v in evaluation.metrics().items()}},
        "grid": str(evaluation.grid),
        "model": {"uri": registered.model_uri, "champion": registered.champion_uri if registered.champion else None,
                  "tracking_uri": registered.tracking_uri},
    }


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ev, f = summary["evaluation"], summary["filtered"]
    table = Table(title=f"PEA · {summary['language']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("acquired", f"{summary['acquired']['downloaded']} of {summary['acquired']['rows']} manifest rows "
                              f"downloaded ({summary['acquired']['shards_skipped']} of {summary['acquired']['shards']}"
                              f" shards were already complete, {summary['acquired']['seconds']} s)")
    table.add_row("filtered", f"{f['rows_out']} of {f['rows_in']} rows kept; dropped {json.dumps(f['dropped'])}")
    table.add_row("embedded", f"computed {json.dumps(summary['embedded']['computed'])}, reused "
                              f"{json.dumps(summary['embedded']['reused'])} ({summary['embedded']['seconds']} s)")
    table.add_row("trained", f"{summary['trained']['steps']} steps, final loss {summary['trained']['final_loss']}, "
                             f"{summary['trained']['samples_per_s']} samples/s")
    table.add_row("evaluation", f"{ev['heldout_pairs']} held-out pairs: UNet-output relative error "
                                f"{ev['rel_error_trained']:.4f} trained vs {ev['rel_error_untrained']:.4f} untrained "
                                f"({ev['improvement']:.0%} lower)")
    table.add_row("model", summary["model"]["uri"] + (f"  (alias: {summary['model']['champion']})"
                                                      if summary["model"]["champion"] else "  (not promoted)"))
    table.add_row("image grid", summary["grid"])
    table.add_row("MLflow UI", f"mlflow ui --backend-store-uri {summary['model']['tracking_uri']}")
    table.add_row("Prefect UI", "prefect server start   (then open http://127.0.0.1:4200)")
    Console(width=max(Console().width, 110)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the pea flow in-process (no Prefect server needed).")
    parser.add_argument("--language", required=True)
    parser.add_argument("--profile", help="e.g. 'embedded': tiny offline models and the synthetic corpus")
    args = parser.parse_args()
    print_summary(pea(args.language, args.profile))


if __name__ == "__main__":
    main()
