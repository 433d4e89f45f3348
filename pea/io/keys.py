"""The lake's content keys and the DuckDB connection that computes them in SQL.

Every stage addresses rows by content: a caption by `text_hash`, a caption pair by `pair_hash` (which also decides
its held-out split), a store's settings by `key_digest`. The corpus stages (manifests, filter) and the tensor
stages (embed, pack) compute them in SQL and in Python alike, through the same functions.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import duckdb
import pyarrow as pa


def text_hash(text: str) -> str:
    """Hash of a caption after Unicode NFC and whitespace normalization."""
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pair_hash(caption_en: str, caption: str) -> str:
    """The address of a caption pair: what decides its held-out split (pea.train.table) and the evaluation sample."""
    return text_hash(caption_en + "\n" + caption)


def connect(spill: Path, memory_limit: str = "1GB", *, threads: int | None = None,
            preserve_order: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection bounded by `memory_limit` (spilling to `spill` beyond it, created only if needed)
    with the store's hashes as SQL functions: `pea_text_hash(text)`, `pea_pair_hash(caption_en, caption)`.
    They run text_hash itself (not DuckDB's Unicode functions), one Arrow batch per call, so SQL and Python
    compute the same addresses. `threads` (None: every core) and `preserve_order` (results in scan order, as
    a url list needs; off by default since it costs memory) are DuckDB's settings of those names."""
    Path(spill).parent.mkdir(parents=True, exist_ok=True)  # DuckDB creates the folder itself, not its parents
    config = {"memory_limit": memory_limit, "preserve_insertion_order": preserve_order,
              "temp_directory": str(spill)}
    if threads is not None:
        config["threads"] = threads
    con = duckdb.connect(config=config)
    text = duckdb.sqltype("VARCHAR")
    con.create_function("pea_text_hash", lambda t: pa.array([text_hash(x) for x in t.to_pylist()], pa.string()),
                        [text], text, type="arrow")
    con.create_function("pea_pair_hash", lambda e, t: pa.array(
        [pair_hash(a, b) for a, b in zip(e.to_pylist(), t.to_pylist())], pa.string()), [text, text], text, type="arrow")
    return con
