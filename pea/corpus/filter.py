"""Filter: the complete raw shards -> `lake/<language>/pairs/pairs.parquet` + the data-quality report.

Only shards whose `*_stats.json` exists are read: img2dataset writes it after closing the shard, so a shard
left by a killed run is never seen. Two passes, so that memory is bounded by a shard and a DuckDB limit:
1. every raw shard is judged by the per-row rules (`pea.corpus.judge`: image and score rules, caption cleaning,
   caption rules, language identification, the custom rule) into a judged part, in this process or as one Ray
   task per shard (`corpus.engine`); parts are kept under `pairs/judged-<rules digest>/`, so a rerun judges only
   the shards it has not judged with these rules;
2. one DuckDB pass over the parts, bounded by `corpus.duckdb.memory_limit` and spilling beyond it, applies the
   global rules (duplicate image, then duplicate caption pair, first key kept), streams the kept pairs in key
   order into pairs.parquet and aggregates the counts and histograms of the report (`pea.corpus.report`).
Every row gets the first reason it fails, in `REASONS` order (the rows acquire dropped before downloading are
counted under the first three); every drop is counted in quality.json, beside the pairs.

pairs.parquet (row groups of 100k rows, ordered by key), documented in docs/data.md:
key (img2dataset's key), image_sha256 (of the downloaded bytes), caption_en, caption (the target
language; both cleaned), width, height (after resizing), raw_file (absolute path of the raw shard:
the image bytes are in its column named after `corpus.encode_format`, in the row with the same key; for
WebDataset output in the .tar of the same name), native (the target caption is native-only, not a
translation of caption_en: the diffusion loss applies to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pea.corpus.engine import map_tasks, session
from pea.corpus.judge import (
    PAIRS_SCHEMA,
    ShardJob,
    judge_shards,
    part_counts,
    part_keys,
)
from pea.corpus.manifest import MANIFEST_REASONS
from pea.corpus.report import ReportData, write_report
from pea.io.atomic import publish
from pea.io.keys import connect
from pea.spec import LanguageSpec

DOWNLOAD_REASONS = ("download_http_error", "download_redirect", "download_timeout", "download_connection",
                    "download_not_image", "download_too_large", "download_disallowed", "download_blocked_address",
                    "download_other")
REASONS = (*MANIFEST_REASONS, *DOWNLOAD_REASONS, "too_small", "too_large", "bad_aspect", "low_similarity", "unsafe",
           "watermark", "caption_empty", "caption_too_short", "caption_too_long", "caption_not_text", "wrong_language",
           "custom_where", "duplicate_image", "duplicate_caption")
PAIRS_COLUMNS = ("key", "image_sha256", "caption_en", "caption", "width", "height", "raw_file", "native")
ROW_GROUP = 100_000
JOB_ROWS = 200_000  # raw rows judged by one task: ~100 MB of metadata and captions; fixed costs paid once
RULES_VERSION = 4  # bump when a per-row rule changes meaning: judged parts of older rules are then redone

# The global rules, over the rows every per-row rule kept (`candidates`). A row whose image an earlier key already
# has is a duplicate image; among the rest, a caption pair beyond its first `keep` images (by key) is a duplicate
# caption. Aggregates and hash joins, not a window over every row: the window's sort was most of the pass; only the
# few crowded caption pairs (templates, spam) are ranked.
DUPLICATES = (
    """CREATE TEMP VIEW candidates AS SELECT key, image_sha256, caption_en, caption
       FROM read_parquet(getvariable('parts')) WHERE reason IS NULL""",
    """CREATE TEMP TABLE image_duplicates AS SELECT c.key FROM candidates c JOIN (
           SELECT image_sha256, min(key) AS first FROM candidates GROUP BY image_sha256 HAVING count(*) > 1) f
       USING (image_sha256) WHERE c.key > f.first""",
    """CREATE TEMP TABLE caption_duplicates AS
       WITH survivors AS (SELECT key, caption_en, caption FROM candidates ANTI JOIN image_duplicates USING (key)),
       crowded AS (SELECT caption_en, caption FROM survivors GROUP BY ALL HAVING count(*) > $keep)
       SELECT key FROM (SELECT key, row_number() OVER (PARTITION BY caption_en, caption ORDER BY key) AS n
                        FROM survivors SEMI JOIN crowded USING (caption_en, caption)) WHERE n > $keep""",
    """CREATE TEMP TABLE duplicates AS SELECT key, 'duplicate_image' AS reason FROM image_duplicates
       UNION ALL SELECT key, 'duplicate_caption' FROM caption_duplicates""",
)
# Every judged row with its final reason (NULL: kept).
FINAL = """CREATE TEMP VIEW final AS
SELECT parts.* REPLACE (coalesce(parts.reason, duplicates.reason) AS reason)
FROM read_parquet(getvariable('parts')) AS parts LEFT JOIN duplicates USING (key)"""


@dataclass(frozen=True)
class FilterResult:
    pairs_path: Path
    rows_in: int  # manifest rows: raw rows + rows dropped before download
    rows_out: int
    dropped: dict[str, int]  # reason -> count, in REASONS order, zeros included
    report_path: Path  # quality.json
    seconds: float
    histograms: dict[str, Path] = field(default_factory=dict)  # image_sizes, aspect_ratios, caption_lengths -> PNG
    report: dict[str, Any] = field(default_factory=dict)  # the content of quality.json


def _complete_shards(raw_dir: Path) -> list[Path]:
    """Raw shards that img2dataset finished (their stats file exists), in shard order."""
    return [p for p in sorted(raw_dir.glob("*.parquet")) if p.with_name(p.stem + "_stats.json").is_file()]


def _rules_digest(spec: LanguageSpec) -> str:
    rules = {"version": RULES_VERSION, "language": spec.language, "caption_column": spec.caption_column,
             "filter": spec.filter.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:16]


def _judge_all(spec: LanguageSpec, shards: list[Path], parts_dir: Path) -> tuple[list[Path], dict[str, int]]:
    """The judged part of every shard, judging the ones missing (as Ray tasks with an engine); summed counts."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    jobs, parts, offset, group, group_rows = [], [], 0, [], 0

    def close_group() -> None:
        nonlocal group, group_rows, offset
        part = parts_dir / f"{group[0].stem}-{group[-1].stem}-{group_rows}.parquet"
        parts.append(part)
        if not part.is_file():
            jobs.append(ShardJob(spec=spec, shards=tuple(map(str, group)), offset=offset, out=str(part)))
        offset, group, group_rows = offset + group_rows, [], 0

    for shard in shards:  # consecutive shards up to JOB_ROWS rows: the same groups on every run over them
        rows = pq.ParquetFile(shard).metadata.num_rows  # the footer only
        if group and group_rows + rows > JOB_ROWS:
            close_group()
        group.append(shard)
        group_rows += rows
    close_group()
    if jobs:
        print(f"filter {spec.language}: judging {sum(len(j.shards) for j in jobs)} of {len(shards)} raw shards"
              f" in {len(jobs)} jobs"
              + (f" on Ray ({spec.corpus.engine.address or 'local cluster'})" if spec.corpus.engine else ""))
        with session(spec.corpus.engine):
            map_tasks(spec.corpus.engine, judge_shards, jobs, label=f"filter {spec.language}")
    totals = {"rows": 0, "language_captions": 0, "lingua_captions": 0}
    for part in parts:
        for name, value in part_counts(part).items():
            totals[name] += value
    for stale in parts_dir.parent.glob("judged-*"):  # parts of other rules: never read again
        if stale != parts_dir:
            shutil.rmtree(stale, ignore_errors=True)
    return parts, totals


def filter_pairs(spec: LanguageSpec, lake: Path) -> FilterResult:
    """Judge every raw row, write the kept pairs and the data-quality report."""
    start = time.perf_counter()
    lang_dir = Path(lake) / spec.language
    raw_dir = (lang_dir / "raw").resolve()
    shards = _complete_shards(raw_dir)
    if not shards:
        raise FileNotFoundError(f"no complete raw shard (a .parquet with its _stats.json) in {raw_dir}; "
                                f"run the acquire stage for {spec.language} first")
    out_dir = lang_dir / "pairs"
    parts, totals = _judge_all(spec, shards, out_dir / f"judged-{_rules_digest(spec)}")

    bounds = spec.corpus.duckdb
    spill = bounds.spill(lang_dir / ".spill", f"filter-{os.getpid()}")
    pairs_path = out_dir / "pairs.parquet"
    with publish(pairs_path, "filter: kept pairs") as tmp:
        con = connect(spill, bounds.memory_limit, threads=bounds.threads)
        try:
            # a view takes no parameters: the part list goes in as a variable
            con.execute("SET VARIABLE parts = $parts", {"parts": [str(p) for p in parts]})
            keep = {"keep": spec.filter.max_images_per_caption_pair or 2**62}
            for statement in DUPLICATES:
                con.execute(statement, keep if "$keep" in statement else None)
            con.execute(FINAL)  # a view: each query below is one streamed scan of the parts
            data = ReportData.start(con)
            with pq.ParquetWriter(tmp, PAIRS_SCHEMA) as writer:
                for batch in _kept_in_key_order(con, parts):  # memory: one batch, whatever the corpus
                    writer.write_batch(batch, row_group_size=ROW_GROUP)
                    data.add_pairs(batch)
            counts = dict(con.execute("SELECT coalesce(reason, 'kept'), count(*) FROM final GROUP BY ALL")
                          .fetchall())
            errors = con.execute("SELECT reason, error_message, count(*) AS n FROM final WHERE error_message IS NOT "
                                 "NULL GROUP BY ALL ORDER BY n DESC, error_message LIMIT 20").fetchall()
            data.add_images(con)
        finally:
            con.close()
            shutil.rmtree(spill, ignore_errors=True)

    before = _before_download(lang_dir)
    dropped = {reason: counts.get(reason, 0) + before.get(reason, 0) for reason in REASONS}
    rows_out = counts.get("kept", 0)
    rows_in = rows_out + sum(dropped.values())
    report = {"language": spec.language, "shards": len(shards), "rows_in": rows_in, "rows_downloaded_or_tried":
              totals["rows"], "rows_out": rows_out, "dropped": dropped,
              "download_errors": [{"reason": r, "message": m, "rows": n} for r, m, n in errors],
              "language_id": {"captions": totals["language_captions"], "lingua": totals["lingua_captions"]},
              "filter": spec.filter.model_dump(mode="json"), "pairs": str(pairs_path.resolve()),
              "seconds": round(time.perf_counter() - start, 3)}
    histograms = write_report(report, data, out_dir, spec.language)
    report["histograms"] = {name: path.name for name, path in histograms.items()}
    return FilterResult(pairs_path=pairs_path, rows_in=rows_in, rows_out=rows_out, dropped=dropped,
                        report_path=out_dir / "quality.json", seconds=time.perf_counter() - start,
                        histograms=histograms, report=report)


def _kept_in_key_order(con: Any, parts: list[Path]) -> Iterator[pa.RecordBatch]:
    """The kept pairs in key order. img2dataset's keys grow with the shard, so the parts (consecutive shards) hold
    disjoint key ranges: each part's kept rows are sorted alone, in memory, and the parts follow their key ranges,
    instead of one sort of the whole corpus. Parts whose ranges overlap (raw shards not written by img2dataset)
    fall back to that one sort, which DuckDB spills to disk."""
    ranges = [part_keys(part) for part in parts]
    ordered = sorted((r, p) for r, p in zip(ranges, parts) if r is not None)
    columns = ", ".join(PAIRS_COLUMNS)
    if any(a[0][1] >= b[0][0] for a, b in zip(ordered, ordered[1:])):
        yield from con.sql(f"SELECT {columns} FROM final WHERE reason IS NULL ORDER BY key").to_arrow_reader(ROW_GROUP)
        return
    for _, part in ordered:
        # con.sql, not con.execute: an executed result is read back through a second statement, which need not
        # keep the ORDER BY on a connection without preserve_insertion_order
        yield from con.sql(f"""SELECT {columns} FROM read_parquet($part) WHERE reason IS NULL
                               AND key NOT IN (SELECT key FROM duplicates) ORDER BY key""",
                           params={"part": str(part)}).to_arrow_reader(ROW_GROUP)


def _before_download(lang_dir: Path) -> dict[str, int]:
    """The pre-download drops acquire counted beside the url list (none when the list was not made by acquire)."""
    summary = lang_dir / "manifest-urls.json"
    if not summary.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(summary.read_text()).get("dropped", {}).items()}
