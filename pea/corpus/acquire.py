"""Acquire: manifest(s) -> img2dataset -> `lake/<language>/raw/` Parquet shards, each with a `*_stats.json`.

A shard is complete only once its stats file exists (img2dataset writes it after closing the
shard), and img2dataset's incremental mode skips complete shards, so a rerun resumes where a killed
run stopped. With `corpus.synthetic` set the synthetic corpus is generated and served on 127.0.0.1
for the duration of the download.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pea.corpus.synthetic import make_corpus, serve
from pea.spec import LanguageSpec, home

# img2dataset imports wandb and albumentations, which reach for the network unless told not to.
OFFLINE_ENV = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


@dataclass(frozen=True)
class AcquireResult:
    raw_dir: Path
    shards_total: int  # complete shards after this call
    shards_skipped: int  # complete before this call, so not downloaded again
    rows: int
    successes: int
    seconds: float


def _stats(raw_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(raw_dir.glob("*_stats.json"))]


def _check_manifest(path: Path, columns: list[str]) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist; fix corpus.manifests in the spec or create the file")
    schema = pq.read_schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {', '.join(missing)} (has {', '.join(schema.names)}); "
                         f"add them, or rename the existing columns to {', '.join(columns)}")
    return pq.ParquetFile(path).metadata.num_rows


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _download(spec: LanguageSpec, url_list: Path, raw_dir: Path) -> None:
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)  # inherited by img2dataset's spawned workers
    import img2dataset  # late: a heavy import, and only after the environment above is set

    previous = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(
            url_list=str(url_list), output_folder=str(raw_dir), input_format="parquet", output_format="parquet",
            url_col="url", caption_col="caption_en", save_additional_columns=[spec.caption_column],
            incremental_mode="incremental", compute_hash="sha256",
            image_size=spec.corpus.image_size, resize_mode="center_crop",
            encode_format="png", encode_quality=9,  # for PNG the "quality" is the zlib level, 0-9
            min_image_size=0,  # size filtering belongs to the filter stage, which counts every drop
            processes_count=spec.corpus.processes, thread_count=spec.corpus.threads,
            timeout=spec.corpus.timeout_s, retries=spec.corpus.retries,
            number_sample_per_shard=spec.corpus.rows_per_shard,
            distributor="multiprocessing", enable_wandb=False,
        )
    finally:
        signal.signal(signal.SIGINT, previous)  # img2dataset's handler calls sys.exit; don't leave it behind


def _missing_shards(raw_dir: Path, rows: int, spec: LanguageSpec) -> bool:
    """True unless every shard is complete: then img2dataset (seconds of process start-up) is not called."""
    return len(_stats(raw_dir)) < math.ceil(rows / spec.corpus.rows_per_shard)


def acquire(spec: LanguageSpec, lake: Path) -> AcquireResult:
    """Download the spec's corpus into `lake/<language>/raw/`, skipping shards that are already complete."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("acquire must run on the main thread: img2dataset installs a SIGINT handler, which "
                           "Python allows only there; call it directly, not from a thread pool")
    start = time.perf_counter()
    lang_dir = Path(lake) / spec.language
    raw_dir = lang_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    skipped = len(_stats(raw_dir))
    columns = ["url", "caption_en", spec.caption_column]

    if spec.corpus.synthetic is not None:
        corpus_dir = lang_dir / "synthetic"
        manifest = make_corpus(spec, corpus_dir)
        rows = _check_manifest(manifest, columns)
        if _missing_shards(raw_dir, rows, spec):
            with serve(corpus_dir) as base_url:
                table = pq.read_table(manifest)
                urls = pa.array([base_url + u for u in table["url"].to_pylist()])
                url_list = corpus_dir / "manifest-urls.parquet"
                _write_atomic(table.set_column(table.schema.get_field_index("url"), "url", urls), url_list)
                _download(spec, url_list, raw_dir)
    else:
        manifests = [p if p.is_absolute() else home() / p for p in map(Path, spec.corpus.manifests)]
        rows = sum(_check_manifest(p, columns) for p in manifests)
        url_list = manifests[0]
        if len(manifests) > 1:
            # img2dataset numbers shards per call, so several manifests become one list in a fixed order.
            url_list = lang_dir / "manifest-urls.parquet"
            tmp = url_list.with_name(url_list.name + ".tmp")
            with duckdb.connect() as con:
                con.execute(f'COPY (SELECT url, caption_en, "{spec.caption_column}" '
                            "FROM read_parquet($files, union_by_name = true)) TO $out (FORMAT parquet)",
                            {"files": [str(p) for p in manifests], "out": str(tmp)})
            os.replace(tmp, url_list)
        if _missing_shards(raw_dir, rows, spec):
            _download(spec, url_list, raw_dir)

    stats = _stats(raw_dir)
    if _missing_shards(raw_dir, rows, spec):
        expected = math.ceil(rows / spec.corpus.rows_per_shard)
        raise RuntimeError(f"only {len(stats)} of {expected} shards in {raw_dir} completed (see img2dataset's "
                           "output above); run acquire again to download the rest")
    return AcquireResult(raw_dir=raw_dir, shards_total=len(stats), shards_skipped=skipped,
                         rows=sum(s["count"] for s in stats), successes=sum(s["successes"] for s in stats),
                         seconds=time.perf_counter() - start)
