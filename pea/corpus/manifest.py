"""Manifests -> one url list for img2dataset: column mapping, formats, fsspec URLs, pre-download drops.

`prepare_url_list(spec, manifests, out)` reads every manifest (Parquet, CSV, TSV or JSONL, optionally
gzipped; a local path or any fsspec URL) with DuckDB, maps its columns to the roles of
`ColumnMapping`, drops rows that must not be fetched (a URL that is not http/https, a row in another
language, a row the reader could not decode) and counts each, and writes the url list (`pea.corpus.urllist`:
a folder of Parquet parts, renamed into place when complete, with a content digest).

Out of core: one DuckDB connection bounded by `corpus.duckdb` (memory_limit, threads; it spills to
spill_dir, default `<out's folder>/.spill`, removed afterwards) streams each manifest's screened rows as
Arrow batches straight into the parts; the drops are counted per batch with pyarrow compute. Nothing
corpus-sized is ever held, in DuckDB or in Python.

The url list has the columns `url, caption_en, caption_<lang>, native` and, when some manifest has the
role's column, `similarity, punsafe, pwatermark, manifest_width, manifest_height, manifest_language`
(NULL where a manifest lacks it), in the manifests' order, so the same manifests always give the same shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pea.corpus.remote import describe, manifest_filesystem, refused_error
from pea.corpus.urllist import (
    GROUP_SHARDS,
    PART_SHARDS,
    PartWriter,
    clear_leftovers,
    digest,
    publish,
)
from pea.io import atomic
from pea.io.addresses import Network, networks
from pea.io.keys import connect
from pea.io.redact import redact
from pea.spec import URL_SCHEMES, LanguageSpec, ManifestSpec, home

# Pre-download drop reasons, in report order.
MANIFEST_REASONS = ("manifest_unreadable", "bad_url", "manifest_language")
OPTIONAL_ROLES = {"similarity": "DOUBLE", "punsafe": "DOUBLE", "pwatermark": "DOUBLE", "width": "INTEGER",
                  "height": "INTEGER", "language": "VARCHAR"}
OUTPUT_NAMES = {"width": "manifest_width", "height": "manifest_height", "language": "manifest_language"}
ARROW_TYPES = {"DOUBLE": pa.float64(), "INTEGER": pa.int32(), "VARCHAR": pa.string()}
BATCH_ROWS = 64 * 1024  # rows per Arrow batch from DuckDB: what Python holds at a time, besides a row group


@dataclass(frozen=True)
class UrlList:
    path: Path  # the folder of parts: img2dataset's url_list
    rows_in: int  # manifest rows read (rejected ones included)
    rows: int  # rows in the url list
    dropped: dict[str, int]  # MANIFEST_REASONS -> count
    extra_columns: list[str]  # columns img2dataset must carry into the raw shards
    parts: tuple[int, ...] = ()  # rows per part, in order
    digest: str = ""  # of the list's content (manifest-urls.json keeps it)
    replaced: bool = True  # False: the list was already there with this digest, its files untouched

    def shards(self, rows_per_shard: int) -> int:
        """img2dataset's shard count: it shards each part on its own (reader.py), numbering on across parts."""
        return sum(math.ceil(rows / rows_per_shard) for rows in self.parts)


def _format(manifest: ManifestSpec) -> str:
    if manifest.format != "auto":
        return manifest.format
    name = manifest.path.lower().split("?")[0]
    name = name[:-3] if name.endswith(".gz") else name
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"manifest {redact(manifest.path)}: cannot tell its format from the name; name it .parquet, .csv, "
                     ".tsv or .jsonl (optionally .gz), or set format in corpus.manifests")


# Each reader names its own reject tables: DuckDB appends every CSV scan's rejects to the connection's tables.
READERS = {
    "parquet": "read_parquet($path)",
    # store_rejects: a row that cannot be decoded (invalid UTF-8, wrong field count) is set aside and counted.
    "csv": "read_csv($path, header = true, delim = ',', store_rejects = true, rejects_table = '{rejects}', "
           "rejects_scan = '{rejects}_scans')",
    "tsv": "read_csv($path, header = true, delim = '\t', quote = '', escape = '', store_rejects = true, "
           "rejects_table = '{rejects}', rejects_scan = '{rejects}_scans')",
    # ignore_errors: a malformed line becomes an all-NULL row, counted as manifest_unreadable.
    "jsonl": "read_json($path, format = 'newline_delimited', ignore_errors = true)",
}


def _location(manifest: ManifestSpec, con: duckdb.DuckDBPyConnection, allowed: tuple[Network, ...] = (),
              filesystems: dict | None = None) -> tuple[str, fsspec.AbstractFileSystem | None]:
    """A path DuckDB can read and the filesystem it reads it through (None: local): local paths resolved against the
    project home; remote URLs (pea.corpus.remote: http(s) only at allowed addresses, on every redirect hop) checked
    to exist and registered with the connection."""
    if "://" not in manifest.path or urlsplit(manifest.path).scheme.lower() in ("file", "local"):
        path = urlsplit(manifest.path).path if "://" in manifest.path else manifest.path
        local = Path(path) if Path(path).is_absolute() else home() / path
        if not local.is_file():
            raise FileNotFoundError(f"manifest {local} does not exist; fix corpus.manifests in the spec or create "
                                    "the file")
        return str(local), None
    fs, path = manifest_filesystem(manifest.path, allowed)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    # DuckDB reads every URL of a protocol through the one filesystem registered for it: use that one here too.
    fs = (filesystems if filesystems is not None else {}).setdefault(protocols[0], fs)
    describe(fs, path, manifest.path)  # exists, and reachable: else one clear error, before DuckDB is involved
    if not any(p in con.list_filesystems() for p in protocols):
        con.register_filesystem(fs)  # once per connection: DuckDB refuses a second one of the same name
    return manifest.path, fs


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'  # an identifier cannot be a parameter


@dataclass(frozen=True)
class _Plan:
    """One manifest, bound and checked: its reader, its mapped columns, which optional roles it has."""

    index: int
    manifest: ManifestSpec
    fmt: str
    source: str
    params: dict
    select: list[str]
    optional: frozenset[str]  # output names of the optional roles this manifest has
    fs: fsspec.AbstractFileSystem | None = None  # a remote manifest's filesystem (its refused addresses)

    def unreadable(self, err: duckdb.Error, doing: str) -> Exception:
        """A read that failed: the address refusal that caused it, else `doing` with DuckDB's reason."""
        if (blocked := refused_error(self.fs, self.manifest.path)) is not None:
            return blocked
        return ValueError(f"manifest {redact(self.manifest.path)} {doing} as {self.fmt}: {redact(str(err))}; fix "
                          f"the file or set format in corpus.manifests[{self.index}]")

    def query(self, columns: list[str]) -> str:
        """The manifest's rows, mapped and judged, in file order; `columns` of the url list plus `reason`."""
        return f"""
            WITH mapped AS (SELECT {', '.join(self.select)} FROM {self.source}),
            judged AS (SELECT *, CASE
                WHEN url IS NULL AND caption IS NULL AND (caption_en IS NULL OR $no_english)
                    THEN 'manifest_unreadable'
                WHEN url IS NULL OR NOT regexp_matches(url, $scheme) THEN 'bad_url'
                WHEN $languages IS NOT NULL AND (manifest_language IS NULL
                     OR NOT list_contains($languages, manifest_language)) THEN 'manifest_language'
                END AS reason FROM mapped)
            SELECT {', '.join(columns)}, reason FROM judged"""


def _plan(spec: LanguageSpec, index: int, manifest: ManifestSpec, con: duckdb.DuckDBPyConnection,
          filesystems: dict) -> _Plan:
    fmt = _format(manifest)
    location, fs = _location(manifest, con, networks(spec.corpus.allow_networks), filesystems)
    source = READERS[fmt].format(rejects=f"pea_rejects_{index}")
    try:  # binds only: nothing is read beyond what the reader sniffs
        has = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}", {"path": location}).fetchall()]
    except duckdb.Error as err:
        raise _Plan(index, manifest, fmt, source, {}, [], frozenset(), fs).unreadable(err, "cannot be read") from None
    cols = manifest.columns
    required = {"url": cols.url, "caption": cols.caption or spec.caption_column}
    if cols.caption_en is not None:
        required["caption_en"] = cols.caption_en
    for role in ("native", *OPTIONAL_ROLES):
        if getattr(cols, role) is not None:
            required[role] = getattr(cols, role)
    missing = [name for name in required.values() if name not in has]
    if missing:
        raise ValueError(f"manifest {redact(manifest.path)} lacks column(s) {', '.join(missing)} (has {', '.join(has)}); "
                         f"add them, or map the existing columns in corpus.manifests[{index}].columns")
    optional = {role: getattr(cols, role) or (role if role in has else None) for role in OPTIONAL_ROLES}
    select = [f"trim(CAST({_quote(required['url'])} AS VARCHAR)) AS url",
              (f"CAST({_quote(required['caption_en'])} AS VARCHAR)" if "caption_en" in required else "''")
              + " AS caption_en",
              f"CAST({_quote(required['caption'])} AS VARCHAR) AS caption"]
    native = "$native" if cols.native is None else f"coalesce(TRY_CAST({_quote(cols.native)} AS BOOLEAN), $native)"
    select.append(f"{native} OR {'true' if 'caption_en' not in required else 'false'} AS native")
    for role, kind in OPTIONAL_ROLES.items():
        expr = f"TRY_CAST({_quote(optional[role])} AS {kind})" if optional[role] else f"CAST(NULL AS {kind})"
        select.append(f"{expr} AS {OUTPUT_NAMES.get(role, role)}")
    params = {"path": location, "native": manifest.native, "no_english": "caption_en" not in required,
              "scheme": "^(?i)(" + "|".join(URL_SCHEMES) + ")://[^/?#]", "languages": manifest.languages}
    return _Plan(index, manifest, fmt, source, params, select,
                 frozenset(OUTPUT_NAMES.get(role, role) for role, name in optional.items() if name), fs)


def _stream(con: duckdb.DuckDBPyConnection, plan: _Plan, columns: list[str], writer: PartWriter,
            dropped: dict[str, int]) -> int:
    """Screen one manifest into the writer, counting drops per batch; the rows read (rejected ones included)."""
    rows = 0
    try:
        reader = con.sql(plan.query(columns), params=plan.params).to_arrow_reader(BATCH_ROWS)
        for batch in reader:
            rows += batch.num_rows
            reason = batch.column("reason")
            if reason.null_count < batch.num_rows:
                for entry in pc.value_counts(reason.drop_null()).to_pylist():  # at most one entry per reason
                    dropped[entry["values"]] += entry["counts"]
                batch = batch.filter(reason.is_null())
            writer.write(batch.drop_columns(["reason"]))
        if plan.fmt in ("csv", "tsv"):
            # fetchall: a result left unfinished blocks the connection's next query
            rejected = con.execute(f"SELECT count(DISTINCT (scan_id, line)) FROM pea_rejects_{plan.index}"
                                   ).fetchall()[0][0]
            dropped["manifest_unreadable"] += rejected
            rows += rejected
    except duckdb.OutOfMemoryException as err:
        raise MemoryError(f"manifest {redact(plan.manifest.path)}: DuckDB ran out of memory ({err}); raise "
                          "corpus.duckdb.memory_limit or give corpus.duckdb.spill_dir more disk") from None
    except duckdb.Error as err:
        raise plan.unreadable(err, "could not be read to the end") from None
    return rows


def prepare_url_list(spec: LanguageSpec, manifests: list[ManifestSpec], out: Path) -> UrlList:
    """Read, map and screen every manifest; write the folder `out` of Parquet parts and `out` with .json (the
    counts, the parts and the digest). An unchanged list keeps its files untouched."""
    if not manifests:
        raise ValueError(f"spec {spec.language}: corpus.manifests is empty; name at least one manifest")
    manifests = [m if isinstance(m, ManifestSpec) else ManifestSpec(path=str(m)) for m in manifests]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(out)
    report = out.with_suffix(".json")
    bounds = spec.corpus.duckdb
    spill = bounds.spill(out.parent / ".spill", f"manifest-{os.getpid()}")
    rows_per_shard = spec.corpus.rows_per_shard
    con = connect(spill, bounds.memory_limit, threads=bounds.threads, preserve_order=True)  # order: stable shards
    writer = None
    try:
        filesystems: dict = {}  # protocol -> the remote filesystem registered with `con`
        plans = [_plan(spec, i, m, con, filesystems) for i, m in enumerate(manifests)]  # every manifest checked before any read
        # Roles no manifest has stay out of the raw shards: decided from the schemas, before any row is read.
        extra = [spec.caption_column, "native"] + [OUTPUT_NAMES.get(r, r) for r in OPTIONAL_ROLES
                                                  if any(OUTPUT_NAMES.get(r, r) in p.optional for p in plans)]
        columns = ["url", "caption_en", f"caption AS {_quote(spec.caption_column)}", *extra[1:]]
        types = {"url": pa.string(), "caption_en": pa.string(), spec.caption_column: pa.string(), "native": pa.bool_()}
        types.update({OUTPUT_NAMES.get(r, r): ARROW_TYPES[k] for r, k in OPTIONAL_ROLES.items()})
        schema = pa.schema([(name, types[name]) for name in ["url", "caption_en", *extra]])
        writer = PartWriter(out, schema, PART_SHARDS * rows_per_shard, GROUP_SHARDS * rows_per_shard)
        rows_in, dropped = 0, {r: 0 for r in MANIFEST_REASONS}
        for plan in plans:
            rows_in += _stream(con, plan, columns, writer, dropped)
        parts = writer.finish()
        if not parts:
            raise ValueError(f"no row of {', '.join(redact(m.path) for m in manifests)} can be fetched (dropped before "
                             f"download: {dropped}); check the URLs and columns")
        replaced = publish(writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        if not bounds.spill_dir:
            try:
                spill.parent.rmdir()  # only when empty: another stage may be spilling there
            except OSError:
                pass
    summary = {"manifests": [redact(m.path) for m in manifests], "rows_in": rows_in, "rows": writer.rows,
               "dropped": dropped, "columns": schema.names, "digest": digest(parts),
               "parts": [vars(p) for p in parts]}
    with atomic.publish(report, "acquire: url list report") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return UrlList(path=out, rows_in=rows_in, rows=writer.rows, dropped=dropped, extra_columns=extra,
                   parts=tuple(p.rows for p in parts), digest=summary["digest"], replaced=replaced)
