"""Manifests -> one url list for img2dataset: column mapping, formats, fsspec URLs, pre-download drops.

`prepare_url_list(spec, manifests, out)` reads every manifest (Parquet, CSV, TSV or JSONL, optionally
gzipped; a local path or any fsspec URL) with DuckDB, maps its columns to the roles of
`ColumnMapping`, drops rows that must not be fetched (a URL that is not http/https, a row in another
language, a row the reader could not decode) and counts each, and writes the url list atomically.

The url list has the columns `url, caption_en, caption_<lang>, native, similarity, punsafe,
pwatermark, manifest_width, manifest_height, manifest_language` (NULL where a manifest lacks the
role), in the manifests' order, so the same manifests always give the same shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pea.spec import URL_SCHEMES, LanguageSpec, ManifestSpec, home

# Pre-download drop reasons, in report order.
MANIFEST_REASONS = ("manifest_unreadable", "bad_url", "manifest_language")
OPTIONAL_ROLES = {"similarity": "DOUBLE", "punsafe": "DOUBLE", "pwatermark": "DOUBLE", "width": "INTEGER",
                  "height": "INTEGER", "language": "VARCHAR"}
OUTPUT_NAMES = {"width": "manifest_width", "height": "manifest_height", "language": "manifest_language"}


@dataclass(frozen=True)
class UrlList:
    path: Path
    rows_in: int  # manifest rows read (rejected ones included)
    rows: int  # rows in the url list
    dropped: dict[str, int]  # MANIFEST_REASONS -> count
    extra_columns: list[str]  # columns img2dataset must carry into the raw shards


def _format(manifest: ManifestSpec) -> str:
    if manifest.format != "auto":
        return manifest.format
    name = manifest.path.lower().split("?")[0]
    name = name[:-3] if name.endswith(".gz") else name
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"manifest {manifest.path}: cannot tell its format from the name; name it .parquet, .csv, "
                     ".tsv or .jsonl (optionally .gz), or set format in corpus.manifests")


READERS = {
    "parquet": "read_parquet($path)",
    # store_rejects: a row that cannot be decoded (invalid UTF-8, wrong field count) is set aside and counted.
    "csv": "read_csv($path, header = true, delim = ',', store_rejects = true)",
    "tsv": "read_csv($path, header = true, delim = '\t', quote = '', escape = '', store_rejects = true)",
    # ignore_errors: a malformed line becomes an all-NULL row, counted as manifest_unreadable.
    "jsonl": "read_json($path, format = 'newline_delimited', ignore_errors = true)",
}


def _location(manifest: ManifestSpec, con: duckdb.DuckDBPyConnection) -> str:
    """A path DuckDB can read: local paths resolved against the project home, other fsspec URLs registered."""
    fs, path = fsspec.core.url_to_fs(manifest.path)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        local = Path(path) if Path(path).is_absolute() else home() / manifest.path
        if not local.is_file():
            raise FileNotFoundError(f"manifest {local} does not exist; fix corpus.manifests in the spec or create "
                                    "the file")
        return str(local)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest {manifest.path} does not exist (fsspec {protocols[0]}); fix "
                                "corpus.manifests in the spec")
    con.register_filesystem(fs)
    return manifest.path


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'  # an identifier cannot be a parameter


def _read_one(spec: LanguageSpec, index: int, manifest: ManifestSpec) -> tuple[pa.Table, int, dict[str, int]]:
    fmt = _format(manifest)
    with duckdb.connect() as con:
        location = _location(manifest, con)
        source = READERS[fmt]
        try:
            has = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}", {"path": location}).fetchall()]
        except duckdb.Error as err:
            raise ValueError(f"manifest {manifest.path} cannot be read as {fmt}: {err}; fix the file or set format "
                             f"in corpus.manifests[{index}]") from None
        cols = manifest.columns
        required = {"url": cols.url, "caption": cols.caption or spec.caption_column}
        if cols.caption_en is not None:
            required["caption_en"] = cols.caption_en
        for role in ("native", *OPTIONAL_ROLES):
            if getattr(cols, role) is not None:
                required[role] = getattr(cols, role)
        missing = [name for name in required.values() if name not in has]
        if missing:
            raise ValueError(f"manifest {manifest.path} lacks column(s) {', '.join(missing)} (has {', '.join(has)}); "
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
        query = f"""
            WITH mapped AS (SELECT {', '.join(select)} FROM {source}),
            judged AS (SELECT *, CASE
                WHEN url IS NULL AND caption IS NULL AND (caption_en IS NULL OR $no_english)
                    THEN 'manifest_unreadable'
                WHEN url IS NULL OR NOT regexp_matches(url, $scheme) THEN 'bad_url'
                WHEN $languages IS NOT NULL AND (manifest_language IS NULL
                     OR NOT list_contains($languages, manifest_language)) THEN 'manifest_language'
                END AS reason FROM mapped)
            SELECT * FROM judged"""
        params = {"path": location, "native": manifest.native, "no_english": "caption_en" not in required,
                  "scheme": "^(?i)(" + "|".join(URL_SCHEMES) + ")://[^/?#]", "languages": manifest.languages}
        table = con.sql(query, params=params).to_arrow_table()
        rejected = 0
        if fmt in ("csv", "tsv"):
            rejected = con.execute("SELECT count(DISTINCT (scan_id, line)) FROM reject_errors").fetchall()[0][0]
    reasons = table["reason"]
    dropped = {r: 0 for r in MANIFEST_REASONS}
    for value in reasons.value_counts().to_pylist():
        if value["values"] is not None:
            dropped[value["values"]] += value["counts"]
    dropped["manifest_unreadable"] += rejected
    keep = table.filter(reasons.is_null()).drop_columns(["reason"])
    return keep, table.num_rows + rejected, dropped


def _write_if_changed(table: pa.Table, path: Path) -> None:
    if path.is_file():
        try:
            if pq.read_table(path).equals(table):
                return  # same list: img2dataset's shards stay valid and nothing is touched
        except (pa.ArrowInvalid, OSError):
            pass
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def prepare_url_list(spec: LanguageSpec, manifests: list[ManifestSpec], out: Path) -> UrlList:
    """Read, map and screen every manifest; write `out` (Parquet) and `out` with .json (the counts)."""
    if not manifests:
        raise ValueError(f"spec {spec.language}: corpus.manifests is empty; name at least one manifest")
    parts, rows_in, dropped = [], 0, {r: 0 for r in MANIFEST_REASONS}
    for index, manifest in enumerate(manifests):
        manifest = manifest if isinstance(manifest, ManifestSpec) else ManifestSpec(path=str(manifest))
        table, n, counts = _read_one(spec, index, manifest)
        parts.append(table.rename_columns([spec.caption_column if c == "caption" else c for c in table.column_names]))
        rows_in += n
        for reason, count in counts.items():
            dropped[reason] += count
    table = pa.concat_tables(parts)
    if table.num_rows == 0:
        raise ValueError(f"no row of {', '.join(m.path if isinstance(m, ManifestSpec) else str(m) for m in manifests)}"
                         f" can be fetched (dropped before download: {dropped}); check the URLs and columns")
    # Roles no manifest has stay out of the raw shards.
    extra = [spec.caption_column, "native"] + [c for c in table.column_names[3:]
                                              if c != "native" and table[c].null_count < table.num_rows]
    table = table.select(["url", "caption_en", *extra])
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_if_changed(table, out)
    summary = {"manifests": [m.path if isinstance(m, ManifestSpec) else str(m) for m in manifests],
               "rows_in": rows_in, "rows": table.num_rows, "dropped": dropped}
    report = out.with_suffix(".json")
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, report)
    return UrlList(path=out, rows_in=rows_in, rows=table.num_rows, dropped=dropped, extra_columns=extra)
