"""Acquire: manifest(s) -> img2dataset -> `lake/<language>/raw/` shards, each with a `*_stats.json`.

The manifests (see `pea.corpus.manifest`: formats, fsspec URLs, column mapping) become one url list,
the folder of Parquet parts `lake/<language>/manifest-urls/`, with the pre-download drops and the list's
digest beside it in `manifest-urls.json` (an unchanged list is not rewritten). img2dataset (see
`pea.corpus.fetch`: the hardened fetch, the spec's guards and engine: Ray when `corpus.engine` is set)
downloads it, numbering its shards on across the parts. A shard is complete only once its stats file
exists (img2dataset writes it after closing the shard), and img2dataset's incremental mode skips complete
shards, so a rerun resumes where a killed run stopped; when every shard is complete img2dataset is not
started at all. A changed list keeps the complete shards, as img2dataset's incremental mode does (the
synthetic corpus's list changes its port every run). With
`corpus.synthetic` set the synthetic corpus is generated and served on 127.0.0.1 for the download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pea.corpus.engine import session
from pea.corpus.fetch import download
from pea.corpus.manifest import UrlList, prepare_url_list
from pea.corpus.synthetic import make_corpus, serve
from pea.io.atomic import publish
from pea.spec import ColumnMapping, LanguageSpec, ManifestSpec


@dataclass(frozen=True)
class AcquireResult:
    raw_dir: Path
    shards_total: int  # complete shards after this call
    shards_skipped: int  # complete before this call, so not downloaded again
    rows: int  # rows img2dataset handled (the url list)
    successes: int
    seconds: float
    manifest_rows: int = 0  # rows read from the manifests
    dropped_before_download: dict[str, int] = field(default_factory=dict)  # MANIFEST_REASONS -> count
    url_list: Path | None = None


RAW_LIST_FILE = "_url_list"


def _stats(raw_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(raw_dir.glob("*_stats.json"))]


def _missing_shards(raw_dir: Path, expected: int) -> list[int]:
    """The shards of 0..expected-1 not yet complete, as img2dataset's incremental mode sees them (a shard is
    done once a `<id>_*.json` exists); when none is missing img2dataset (seconds of start-up) is not called."""
    done = {int(p.name.split("_")[0]) for p in raw_dir.glob("*.json") if p.name.split("_")[0].isdigit()}
    return sorted(set(range(expected)) - done)


def _shards_of(raw_dir: Path, identity: str) -> None:
    """Raw shards are numbered, and img2dataset takes a numbered shard as done, so shards of another list stay
    under the new list's numbers. For a manifest that is what incremental downloading wants (docs/data.md); for
    the synthetic corpus, whose rows and images change with its spec, it kept stale ones: its manifest's digest
    is recorded beside the shards (`_url_list`) and shards of another are removed first. Shards with no record
    (an older lake) are kept and the record written."""
    record = raw_dir / RAW_LIST_FILE
    if record.is_file() and record.read_text().strip() != identity:
        stale = raw_dir.with_name(f".{raw_dir.name}-stale-{uuid.uuid4().hex[:8]}")
        os.rename(raw_dir, stale)  # one rename: never a raw folder holding half of each list
        shutil.rmtree(stale)
        raw_dir.mkdir()
    if not record.is_file():
        with publish(record, "acquire: the url list of the raw shards") as tmp:
            tmp.write_text(identity + "\n")


def _synthetic_manifest(spec: LanguageSpec, corpus_dir: Path, base_url: str) -> ManifestSpec:
    """The synthetic manifest with absolute loopback URLs (the port changes per run; the shards do not)."""
    manifest = make_corpus(spec, corpus_dir)
    table = pq.read_table(manifest)
    urls = pa.array([u if "://" in u else base_url + u for u in table["url"].to_pylist()])
    served = corpus_dir / "manifest-served.parquet"
    with publish(served, "acquire: served synthetic manifest") as tmp:
        pq.write_table(table.set_column(table.schema.get_field_index("url"), "url", urls), tmp)
    return ManifestSpec(path=str(served), columns=ColumnMapping(native="native"))


def acquire(spec: LanguageSpec, lake: Path) -> AcquireResult:
    """Download the spec's corpus into `lake/<language>/raw/`, skipping shards that are already complete."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("acquire must run on the main thread: img2dataset installs a SIGINT handler, which "
                           "Python allows only there; call it directly, not from a thread pool")
    start = time.perf_counter()
    lang_dir = Path(lake) / spec.language
    raw_dir = lang_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    skipped = 0
    url_path = lang_dir / "manifest-urls"
    (lang_dir / "manifest-urls.parquet").unlink(missing_ok=True)  # the single-file list of earlier versions

    def run(manifests: list[ManifestSpec], identity: str | None = None) -> UrlList:
        nonlocal skipped
        urls = prepare_url_list(spec, manifests, url_path)
        if identity is not None:
            _shards_of(raw_dir, identity)
        skipped = len(_stats(raw_dir))
        if _missing_shards(raw_dir, urls.shards(spec.corpus.rows_per_shard)):
            download(spec, urls.path, raw_dir, urls.extra_columns)
        return urls

    with session(spec.corpus.engine):  # img2dataset's ray distributor, when the spec names the engine
        if spec.corpus.synthetic is not None:
            corpus_dir = lang_dir / "synthetic"
            with serve(corpus_dir) as base_url:
                manifest = _synthetic_manifest(spec, corpus_dir, base_url)
                # Its images change with the spec (noise, culture rows) under the same numbering, and its served
                # URLs name a new port each run: its shards are tied to the corpus's own manifest.
                urls = run([manifest], hashlib.sha256((corpus_dir / "manifest.parquet").read_bytes()).hexdigest())
        else:
            urls = run(list(spec.corpus.manifests))

    stats = _stats(raw_dir)
    expected = urls.shards(spec.corpus.rows_per_shard)
    missing = _missing_shards(raw_dir, expected)
    if missing:
        raise RuntimeError(f"{len(missing)} of {expected} shards in {raw_dir} did not complete (first: {missing[0]}; "
                           "see img2dataset's output above); run acquire again to download the rest")
    return AcquireResult(raw_dir=raw_dir, shards_total=len(stats), shards_skipped=skipped,
                         rows=sum(s["count"] for s in stats), successes=sum(s["successes"] for s in stats),
                         seconds=time.perf_counter() - start, manifest_rows=urls.rows_in,
                         dropped_before_download=urls.dropped, url_list=urls.path)
