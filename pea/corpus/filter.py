"""Filter: DuckDB over the complete raw shards -> `lake/<language>/pairs/pairs.parquet` + `quality.json`.

Only shards whose `*_stats.json` exists are read: img2dataset writes it after closing the shard, so
a shard left by a killed run is never seen. Every row gets the first reason it fails, in `REASONS`
order, and every drop is counted in the data-quality report.

pairs.parquet columns: key (img2dataset's key), image_sha256 (of the downloaded bytes), caption_en,
caption (the target language), width, height (after resizing), raw_file (absolute path of the raw
shard). The image bytes stay in raw_file, in the column named after img2dataset's encode_format
(`png` here, see pea.corpus.acquire), in the row with the same key.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pea.spec import LanguageSpec

REASONS = ("download_failed", "too_small", "bad_aspect", "caption_empty", "caption_too_long", "duplicate")

# The first failing check names the reason; duplicates are ranked only among rows that passed the others.
# raw columns: img2dataset renames the caption_col (caption_en) to `caption`; the target caption keeps its name.
JUDGE = """
CREATE TEMP TABLE judged AS
WITH raw AS (
    SELECT key, status, sha256 AS image_sha256, caption AS caption_en, {target} AS caption,
           width, height, original_width, original_height, filename AS raw_file
    FROM read_parquet($files, filename = true)
), checked AS (
    SELECT *, CASE
        WHEN status IS DISTINCT FROM 'success' THEN 'download_failed'
        WHEN least(width, height, original_width, original_height) < $min_side THEN 'too_small'
        WHEN greatest(original_width, original_height)::DOUBLE / least(original_width, original_height) > $max_aspect
            THEN 'bad_aspect'
        WHEN length(trim(coalesce(caption_en, ''))) < $min_chars OR length(trim(coalesce(caption, ''))) < $min_chars
            THEN 'caption_empty'
        WHEN length(caption_en) > $max_chars OR length(caption) > $max_chars THEN 'caption_too_long'
    END AS reason
    FROM raw
)
SELECT * EXCLUDE (reason), coalesce(reason, CASE WHEN row_number() OVER (
    PARTITION BY reason, image_sha256, caption_en, caption ORDER BY key) > 1 THEN 'duplicate' END) AS reason
FROM checked
"""

PAIRS = """
COPY (SELECT key, image_sha256, caption_en, caption, width, height, raw_file
      FROM judged WHERE reason IS NULL ORDER BY key)
TO $out (FORMAT parquet, ROW_GROUP_SIZE 100000)
"""


@dataclass(frozen=True)
class FilterResult:
    pairs_path: Path
    rows_in: int
    rows_out: int
    dropped: dict[str, int]  # reason -> count, in REASONS order, zeros included
    report_path: Path
    seconds: float


def _complete_shards(raw_dir: Path) -> list[Path]:
    """Raw shards that img2dataset finished (their stats file exists), in shard order."""
    return [p for p in sorted(raw_dir.glob("*.parquet")) if p.with_name(p.stem + "_stats.json").is_file()]


def filter_pairs(spec: LanguageSpec, lake: Path) -> FilterResult:
    """Judge every raw row, write the kept pairs and the data-quality report."""
    start = time.perf_counter()
    raw_dir = (Path(lake) / spec.language / "raw").resolve()
    shards = _complete_shards(raw_dir)
    if not shards:
        raise FileNotFoundError(f"no complete raw shard (a .parquet with its _stats.json) in {raw_dir}; "
                                f"run the acquire stage for {spec.language} first")
    out_dir = Path(lake) / spec.language / "pairs"
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_path, report_path = out_dir / "pairs.parquet", out_dir / "quality.json"
    tmp = out_dir / "pairs.parquet.tmp"
    target = '"' + spec.caption_column.replace('"', '""') + '"'  # an identifier cannot be a parameter
    f = spec.filter
    with duckdb.connect() as con:
        con.execute(JUDGE.format(target=target), {
            "files": [str(p) for p in shards], "min_side": f.min_image_side, "max_aspect": f.max_aspect_ratio,
            "min_chars": f.min_caption_chars, "max_chars": f.max_caption_chars})
        con.execute(PAIRS, {"out": str(tmp)})
        counts = dict(con.execute("SELECT coalesce(reason, 'kept'), count(*) FROM judged GROUP BY ALL").fetchall())
    os.replace(tmp, pairs_path)

    dropped = {reason: counts.get(reason, 0) for reason in REASONS}
    rows_out = counts.get("kept", 0)
    rows_in = rows_out + sum(dropped.values())
    report = {"language": spec.language, "shards": len(shards), "rows_in": rows_in, "rows_out": rows_out,
              "dropped": dropped}
    tmp_report = out_dir / "quality.json.tmp"
    tmp_report.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_report, report_path)
    return FilterResult(pairs_path=pairs_path, rows_in=rows_in, rows_out=rows_out, dropped=dropped,
                        report_path=report_path, seconds=time.perf_counter() - start)
