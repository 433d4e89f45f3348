"""The filter's per-row rules over raw shards: `judge_shards(job)` writes the judged part of a few shards.

Every rule but the two duplicate rules reads one row only, so each raw shard is judged on its own (in this
process, or as a Ray task with `corpus.engine`) and the global rules run afterwards over the parts
(`pea.corpus.filter`). Order, as in docs/data.md: the image and score rules in SQL over every row; then, for
the rows they keep only, caption cleaning, the caption rules, language identification (on the distinct
captions still undecided) and the custom rule. A row gets the first reason it fails.

A judged part holds one row per raw row: reason (NULL: passed every per-row rule), status, error_message,
original_width, original_height, and for the rows that reached the caption rules their key, rid (the row's
position in the raw shards, in shard order), the cleaned captions and the other columns pairs.parquet needs. It is written
under a temporary name and renamed, so a part that exists is complete; its metadata carries the counts.

All SQL is parameterized; the one piece of user text, `filter.where`, runs only as DuckDB's rendering of a
checked read-only expression (`pea.corpus.where`), after external access is switched off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pea.corpus.clean import clean_captions, text_ratios
from pea.corpus.langid import wrong_language
from pea.corpus.where import read_only_where
from pea.io.atomic import publish
from pea.spec import LanguageSpec

OPTIONAL = {"similarity": "DOUBLE", "punsafe": "DOUBLE", "pwatermark": "DOUBLE"}
NEEDED = ("key", "status", "error_message", "sha256", "caption", "width", "height", "original_width",
          "original_height")
PAIRS_SCHEMA = pa.schema([("key", pa.string()), ("image_sha256", pa.string()), ("caption_en", pa.string()),
                          ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                          ("raw_file", pa.string()), ("native", pa.bool_())])
PART_SCHEMA = pa.schema([("key", pa.string()), ("rid", pa.int64()), ("reason", pa.string()),
                         ("status", pa.string()), ("error_message", pa.string()), ("original_width", pa.int64()),
                         ("original_height", pa.int64()), ("image_sha256", pa.string()), ("caption_en", pa.string()),
                         ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                         ("raw_file", pa.string()), ("native", pa.bool_())])

# img2dataset's status/error_message -> a reason. pea.corpus.fetch prefixes its errors with their class;
# the resizer's own messages and plain img2dataset errors (another fetch) are matched by their text.
DOWNLOAD_CLASS = """CASE
    WHEN status = 'failed_to_resize' THEN CASE error_message
        WHEN 'image too small' THEN 'too_small' WHEN 'image area too large' THEN 'too_large'
        WHEN 'aspect ratio too large' THEN 'bad_aspect' ELSE 'download_not_image' END
    WHEN error_message LIKE 'blocked_address:%' THEN 'download_blocked_address'
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


@dataclass(frozen=True)
class ShardJob:
    """Consecutive raw shards judged as one table (one task: its fixed costs, e.g. checking the custom rule and
    loading lingua, are paid once per job, not per 10k-row shard). `offset`: raw rows in the shards before them."""

    spec: LanguageSpec
    shards: tuple[str, ...]
    offset: int
    out: str


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'  # an identifier cannot be a parameter


def _load(con: duckdb.DuckDBPyConnection, job: ShardJob) -> pa.Table:
    """The shards' rows in shard and row order, with the columns the rules read, numbered by position (rid)."""
    return pa.concat_tables([_load_one(con, job.spec, shard) for shard in job.shards]).append_column(
        "rid", pa.array(np.arange(job.offset, job.offset + sum(_rows(s) for s in job.shards), dtype=np.int64)))


def _rows(shard: str) -> int:
    return pq.ParquetFile(shard).metadata.num_rows


def _load_one(con: duckdb.DuckDBPyConnection, spec: LanguageSpec, shard: str) -> pa.Table:
    has = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($f)", {"f": shard}).fetchall()}
    missing = [c for c in [*NEEDED, spec.caption_column] if c not in has]
    if missing:
        raise ValueError(f"raw shard {shard} lacks column(s) {', '.join(missing)} (has {', '.join(sorted(has))}); "
                         f"it was not written by this acquire stage for {spec.language}: delete "
                         f"{Path(shard).parent} and run acquire again")
    optional = ", ".join(f"{_quote(c) if c in has else 'NULL'}::{t} AS {c}" for c, t in OPTIONAL.items())
    native = f"coalesce({_quote('native')}::BOOLEAN, false)" if "native" in has else "false"
    return con.sql(f"""
        SELECT key, status, error_message, sha256 AS image_sha256, caption AS caption_en,
               {_quote(spec.caption_column)} AS caption, width::INTEGER AS width, height::INTEGER AS height,
               original_width::BIGINT AS original_width, original_height::BIGINT AS original_height,
               {optional}, {native} AS native, $f AS raw_file
        FROM read_parquet($f)""", params={"f": shard}).to_arrow_table()


def judge_shards(job: ShardJob) -> dict[str, int]:
    """Judge the job's raw shards by every per-row rule and write their part to `job.out`; returns its counts
    (rows, the distinct captions language identification judged, and how many of those went to lingua)."""
    f = job.spec.filter
    counts = {"rows": 0, "language_captions": 0, "lingua_captions": 0}
    with duckdb.connect(config={"threads": 1}) as con:  # a job is one task's work: parallelism is per job
        raw = _load(con, job)
        counts["rows"] = raw.num_rows
        # Nothing below reads or writes a file through DuckDB: switch that off before any user text runs.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.register("raw", raw)
        metadata = con.sql(f"SELECT {METADATA_REASON} AS reason FROM raw", params={
            "min_side": f.min_image_side, "max_pixels": f.max_image_pixels, "max_aspect": f.max_aspect_ratio,
            "min_similarity": f.min_similarity, "max_punsafe": f.max_punsafe, "max_pwatermark": f.max_pwatermark,
        }).to_arrow_table()["reason"]
        con.unregister("raw")
        undecided = metadata.is_null()
        survivors = raw.filter(undecided)
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
                wrong, by_lingua = wrong_language(job.spec, captions["caption"])
                counts["language_captions"], counts["lingua_captions"] = captions.num_rows, by_lingua
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
        judged = con.sql("SELECT key, rid, reason, image_sha256, caption_en, caption, width, height, raw_file, native "
                         "FROM candidates ORDER BY rid").to_arrow_table()

    # Every raw row, in row order: the caption-side verdict where the row got that far, else the metadata one.
    index = np.full(raw.num_rows, -1, np.int64)
    index[np.flatnonzero(undecided.to_numpy(zero_copy_only=False))] = np.arange(judged.num_rows)
    take = pa.array(index, mask=index < 0)  # a null index takes a null
    # Rows the image and score rules dropped keep only what the report counts (reason, status, error, sizes): no
    # key or captions to write and read again, so a part costs little more than the candidates it carries.
    columns = {"key": pc.take(judged["key"], take), "rid": pc.take(judged["rid"], take),
               "reason": pc.coalesce(pc.take(judged["reason"], take), metadata),
               "status": raw["status"], "error_message": raw["error_message"],
               "original_width": raw["original_width"], "original_height": raw["original_height"]}
    for name in ("image_sha256", "caption_en", "caption", "width", "height", "raw_file", "native"):
        columns[name] = pc.take(judged[name], take)
    keys = pc.min_max(judged.filter(pc.is_null(judged["reason"]))["key"])  # the key range of the candidates
    bounds = None if keys["min"].as_py() is None else [keys["min"].as_py(), keys["max"].as_py()]
    part = pa.table(columns, schema=PART_SCHEMA.with_metadata({"pea_counts": json.dumps(counts),
                                                               "pea_keys": json.dumps(bounds)}))
    with publish(Path(job.out), "filter: judged part") as tmp:
        pq.write_table(part, tmp, use_dictionary=["reason", "status", "error_message", "raw_file"])  # rest: unique
    return counts


def part_counts(path: Path) -> dict[str, int]:
    """The counts a complete part recorded when it was judged."""
    return json.loads(pq.read_schema(path).metadata[b"pea_counts"])


def part_keys(path: Path) -> tuple[str, str] | None:
    """The smallest and largest key of a part's candidates (None: it has none)."""
    bounds = json.loads(pq.read_schema(path).metadata[b"pea_keys"])
    return None if bounds is None else (bounds[0], bounds[1])
