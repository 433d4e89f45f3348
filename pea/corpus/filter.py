"""Filter: DuckDB over the complete raw shards -> `lake/<language>/pairs/pairs.parquet` + the data-quality report.

Only shards whose `*_stats.json` exists are read: img2dataset writes it after closing the shard, so
a shard left by a killed run is never seen. Captions are cleaned first (`pea.corpus.clean`), then every
row gets the first reason it fails, in `REASONS` order (the rows acquire dropped before downloading are
counted under the first three), and every drop is counted in the data-quality report
(`pea.corpus.report`: quality.json and histograms, beside the pairs).

pairs.parquet (row groups of 100k rows, ordered by key), documented in docs/data.md:
key (img2dataset's key), image_sha256 (of the downloaded bytes), caption_en, caption (the target
language; both cleaned), width, height (after resizing), raw_file (absolute path of the raw shard:
the image bytes are in its column named after `corpus.encode_format`, in the row with the same key; for
WebDataset output in the .tar of the same name), native (the target caption is native-only, not a
translation of caption_en: the diffusion loss applies to it).

All SQL is parameterized; the one piece of user text, `filter.where`, runs only as DuckDB's own
rendering of a checked read-only expression (`pea.corpus.where`), after external access is switched off.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pea.corpus.clean import clean_captions, text_ratios
from pea.corpus.langid import wrong_language
from pea.corpus.manifest import MANIFEST_REASONS
from pea.corpus.report import write_report
from pea.corpus.where import read_only_where
from pea.spec import LanguageSpec

DOWNLOAD_REASONS = ("download_http_error", "download_redirect", "download_timeout", "download_connection",
                    "download_not_image", "download_too_large", "download_disallowed", "download_other")
REASONS = (*MANIFEST_REASONS, *DOWNLOAD_REASONS, "too_small", "too_large", "bad_aspect", "low_similarity", "unsafe",
           "watermark", "caption_empty", "caption_too_short", "caption_too_long", "caption_not_text", "wrong_language",
           "custom_where", "duplicate_image", "duplicate_caption")
PAIRS_COLUMNS = ("key", "image_sha256", "caption_en", "caption", "width", "height", "raw_file", "native")
ROW_GROUP = 100_000
OPTIONAL = {"similarity": "DOUBLE", "punsafe": "DOUBLE", "pwatermark": "DOUBLE", "native": "BOOLEAN"}

# img2dataset's status/error_message -> a reason. pea.corpus.fetch prefixes its errors with their class;
# the resizer's own messages and plain img2dataset errors (another fetch) are matched by their text.
DOWNLOAD_CLASS = """CASE
    WHEN status = 'failed_to_resize' THEN CASE error_message
        WHEN 'image too small' THEN 'too_small' WHEN 'image area too large' THEN 'too_large'
        WHEN 'aspect ratio too large' THEN 'bad_aspect' ELSE 'download_not_image' END
    WHEN error_message LIKE 'http_error:%' OR error_message LIKE 'HTTP Error 4%' OR error_message LIKE 'HTTP Error 5%'
        THEN 'download_http_error'
    WHEN error_message LIKE 'redirect:%' OR error_message LIKE 'HTTP Error 3%' THEN 'download_redirect'
    WHEN error_message LIKE 'timeout:%' OR error_message ILIKE '%timed out%' THEN 'download_timeout'
    WHEN error_message LIKE 'connection:%' OR error_message LIKE '<urlopen error%' THEN 'download_connection'
    WHEN error_message LIKE 'not_image:%' THEN 'download_not_image'
    WHEN error_message LIKE 'too_large:%' THEN 'download_too_large'
    WHEN error_message LIKE 'disallowed:%' OR error_message LIKE '%X-Robots-Tag%' THEN 'download_disallowed'
    WHEN error_message LIKE 'bad_url:%' THEN 'bad_url'
    ELSE 'download_other' END"""

# The rules that read only the image and the manifest's scores: run over every row, in SQL.
METADATA_REASON = f"""CASE
    WHEN status IS DISTINCT FROM 'success' THEN {DOWNLOAD_CLASS}
    WHEN least(width, height, original_width, original_height) < $min_side THEN 'too_small'
    WHEN original_width::BIGINT * original_height > $max_pixels THEN 'too_large'
    WHEN greatest(original_width, original_height)::DOUBLE / least(original_width, original_height) > $max_aspect
        THEN 'bad_aspect'
    WHEN similarity < $min_similarity THEN 'low_similarity'
    WHEN punsafe > $max_punsafe THEN 'unsafe'
    WHEN pwatermark > $max_pwatermark THEN 'watermark'
    END"""

# The caption rules: run only over the rows the metadata rules kept, after their captions are cleaned.
# text_ratio(_en): letters / non-space characters (pea.corpus.clean.text_ratios).
CAPTION_REASON = """CASE
    WHEN length(caption) = 0 OR (NOT native AND length(caption_en) = 0) THEN 'caption_empty'
    WHEN length(caption) < $min_chars OR (NOT native AND length(caption_en) < $min_chars) THEN 'caption_too_short'
    WHEN length(caption) > $max_chars OR length(caption_en) > $max_chars THEN 'caption_too_long'
    WHEN text_ratio < $min_ratio OR (NOT native AND text_ratio_en < $min_ratio) THEN 'caption_not_text'
    END"""

DEDUPE = """
UPDATE candidates SET reason = $reason WHERE rid IN (
    SELECT rid FROM (SELECT rid, row_number() OVER (PARTITION BY {by} ORDER BY key) AS n
                     FROM candidates WHERE reason IS NULL) WHERE n > $keep)
"""


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


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'  # an identifier cannot be a parameter


def _load(con: duckdb.DuckDBPyConnection, spec: LanguageSpec, shards: list[Path]) -> pa.Table:
    """Every raw row, in shard and row order, numbered by that position (`rid`)."""
    files = [str(p) for p in shards]
    has = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($f, union_by_name = true)",
                                     {"f": files}).fetchall()}
    needed = ["key", "status", "error_message", "sha256", "caption", "width", "height", "original_width",
              "original_height"]
    missing = [c for c in [*needed, spec.caption_column] if c not in has]
    if missing:
        raise ValueError(f"raw shards in {shards[0].parent} lack column(s) {', '.join(missing)} (have "
                         f"{', '.join(sorted(has))}); they were not written by this acquire stage for "
                         f"{spec.language}: delete {shards[0].parent} and run acquire again")
    optional = ", ".join(f"{_quote(c) if c in has else 'NULL'}::{t} AS {c}" for c, t in OPTIONAL.items()
                         if c != "native")
    native = f"coalesce({_quote('native')}::BOOLEAN, false)" if "native" in has else "false"
    raw = con.sql(f"""
        SELECT key, status, error_message, sha256 AS image_sha256, caption AS caption_en,
               {_quote(spec.caption_column)} AS caption, width, height, original_width, original_height,
               {optional}, {native} AS native, filename AS raw_file
        FROM read_parquet($f, filename = true, union_by_name = true)""", params={"f": files}).to_arrow_table()
    return raw.append_column("rid", pa.array(np.arange(raw.num_rows, dtype=np.int64)))


def filter_pairs(spec: LanguageSpec, lake: Path) -> FilterResult:
    """Judge every raw row, write the kept pairs and the data-quality report.

    The metadata rules run in SQL over every row first; only the rows they keep have their captions cleaned
    and then judged by the caption rules, lingua, the custom rule and the duplicate rules (table
    `candidates`): each row still gets the first reason it fails, and cleaning, the slow part, runs only
    where a caption can matter."""
    start = time.perf_counter()
    lang_dir = Path(lake) / spec.language
    raw_dir = (lang_dir / "raw").resolve()
    shards = _complete_shards(raw_dir)
    if not shards:
        raise FileNotFoundError(f"no complete raw shard (a .parquet with its _stats.json) in {raw_dir}; "
                                f"run the acquire stage for {spec.language} first")
    out_dir = lang_dir / "pairs"
    out_dir.mkdir(parents=True, exist_ok=True)
    f = spec.filter
    with duckdb.connect() as con:
        raw = _load(con, spec, shards)
        # Nothing below reads or writes a file through DuckDB: switch that off before any user text runs.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.register("raw", raw)
        con.execute(f"""CREATE TEMP TABLE judged AS SELECT rid, status, error_message, original_width,
                            original_height, {METADATA_REASON} AS reason FROM raw""", {
            "min_side": f.min_image_side, "max_pixels": f.max_image_pixels, "max_aspect": f.max_aspect_ratio,
            "min_similarity": f.min_similarity, "max_punsafe": f.max_punsafe, "max_pwatermark": f.max_pwatermark})
        con.unregister("raw")

        undecided = con.sql("SELECT reason IS NULL AS undecided FROM judged ORDER BY rid").to_arrow_table()
        survivors = raw.filter(undecided["undecided"])  # rid is the row's position in raw
        for name, texts in (("caption_en", clean_captions(survivors["caption_en"], f.cleaning, target=False)),
                            ("caption", clean_captions(survivors["caption"], f.cleaning, target=True,
                                                       native=survivors["native"]))):
            survivors = survivors.set_column(survivors.schema.get_field_index(name), name, texts)
        survivors = survivors.append_column("text_ratio_en", text_ratios(survivors["caption_en"]))
        survivors = survivors.append_column("text_ratio", text_ratios(survivors["caption"]))
        con.register("survivors", survivors)
        con.execute(f"""CREATE TEMP TABLE candidates AS
                        SELECT * EXCLUDE (text_ratio_en, text_ratio), {CAPTION_REASON} AS reason FROM survivors""",
                    {"min_chars": f.min_caption_chars, "max_chars": f.max_caption_chars, "min_ratio": f.min_text_ratio})
        con.unregister("survivors")

        if f.language_id is not None:
            captions = con.sql("SELECT DISTINCT caption FROM candidates WHERE reason IS NULL").to_arrow_table()
            if captions.num_rows:
                wrong, _ = wrong_language(spec, captions["caption"])
                con.register("verdict", captions.append_column("wrong", wrong))
                con.execute("""UPDATE candidates SET reason = 'wrong_language' FROM verdict
                               WHERE candidates.reason IS NULL AND candidates.caption = verdict.caption
                                 AND verdict.wrong""")
                con.unregister("verdict")

        if f.where is not None:
            columns = [r[0] for r in con.execute("DESCRIBE candidates").fetchall() if r[0] != "reason"]
            # Only rows still undecided can fail the custom rule, so only they are shown to it.
            con.execute("CREATE TEMP VIEW judged_rows AS SELECT * EXCLUDE (reason) FROM candidates WHERE reason IS NULL")
            keep = read_only_where(con, f.where, "judged_rows", columns)
            con.execute(f"CREATE TEMP TABLE custom_keep AS {keep}")
            con.execute("UPDATE candidates SET reason = 'custom_where' WHERE reason IS NULL "
                        "AND rid NOT IN (SELECT rid FROM custom_keep)")

        con.execute(DEDUPE.format(by="image_sha256"), {"reason": "duplicate_image", "keep": 1})
        if f.max_images_per_caption_pair is not None:
            con.execute(DEDUPE.format(by="caption_en, caption"),
                        {"reason": "duplicate_caption", "keep": f.max_images_per_caption_pair})

        pairs = con.sql(f"SELECT {', '.join(PAIRS_COLUMNS)} FROM candidates WHERE reason IS NULL ORDER BY key"
                        ).to_arrow_table()
        counts = dict(con.execute("""SELECT reason, count(*) FROM judged WHERE reason IS NOT NULL GROUP BY ALL
                                     UNION ALL SELECT coalesce(reason, 'kept'), count(*) FROM candidates GROUP BY ALL"""
                                  ).fetchall())
        con.execute("CREATE TEMP VIEW final AS SELECT judged.* REPLACE (coalesce(judged.reason, candidates.reason) "
                    "AS reason), judged.reason IS NULL AND candidates.reason IS NULL AS kept "
                    "FROM judged LEFT JOIN candidates USING (rid)")
        images = con.sql("SELECT original_width, original_height, kept FROM final WHERE status = 'success'"
                         ).to_arrow_table()
        errors = con.execute("SELECT reason, error_message, count(*) AS n FROM final WHERE error_message IS NOT NULL "
                             "GROUP BY ALL ORDER BY n DESC, error_message LIMIT 20").fetchall()
        rows_raw = con.execute("SELECT count(*) FROM judged").fetchall()[0][0]

    pairs_path = out_dir / "pairs.parquet"
    tmp = out_dir / "pairs.parquet.tmp"
    pq.write_table(pairs, tmp, row_group_size=ROW_GROUP)
    os.replace(tmp, pairs_path)

    before = _before_download(lang_dir)
    dropped = {reason: counts.get(reason, 0) + before.get(reason, 0) for reason in REASONS}
    rows_out = counts.get("kept", 0)
    rows_in = rows_out + sum(dropped.values())
    report = {"language": spec.language, "shards": len(shards), "rows_in": rows_in, "rows_downloaded_or_tried":
              rows_raw, "rows_out": rows_out, "dropped": dropped,
              "download_errors": [{"reason": r, "message": m, "rows": n} for r, m, n in errors],
              "filter": f.model_dump(mode="json"), "pairs": str(pairs_path.resolve()),
              "seconds": round(time.perf_counter() - start, 3)}
    histograms = write_report(report, images, pairs.select(["caption_en", "caption"]), out_dir, spec.language)
    report["histograms"] = {name: path.name for name, path in histograms.items()}
    return FilterResult(pairs_path=pairs_path, rows_in=rows_in, rows_out=rows_out, dropped=dropped,
                        report_path=out_dir / "quality.json", seconds=time.perf_counter() - start,
                        histograms=histograms, report=report)


def _before_download(lang_dir: Path) -> dict[str, int]:
    """The pre-download drops acquire counted beside the url list (none when the list was not made by acquire)."""
    summary = lang_dir / "manifest-urls.json"
    if not summary.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(summary.read_text()).get("dropped", {}).items()}
