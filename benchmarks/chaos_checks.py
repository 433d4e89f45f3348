"""What benchmarks/chaos.py compares after each trial: per-stage digests of the trial folder, and the checks for
partial files, duplicates and leftover temps. The data is the embedded default's (hundreds of rows), read whole."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

TOLERANCE = 1e-6  # adapter weights and metrics (fp32); everything else must be byte-identical but the pack's tensors
TENSOR_TOLERANCE = 2e-3  # the pack's fp16 tensors: an fp16 step is 1e-3 of the value; a wrong or misplaced row is far off


def _lake(work: Path) -> Path:
    return work / "trial" / "lake"


def _stores(work: Path) -> list[Path]:
    return sorted(p.parent for p in _lake(work).rglob("store.json"))


def _sql(query: str, params: dict | None = None) -> list[tuple]:
    with duckdb.connect() as con:
        return con.execute(query, params).fetchall()


def _visible(path: Path) -> bool:
    return not any(part.startswith(".") or part == "corrupt" for part in path.parts[-4:])


def digest(stage: str, work: Path, language: str = "zh") -> dict:
    """What the stage produced, in a form two runs can be compared by (`same`)."""
    lake = _lake(work)
    if stage == "acquire":
        raw = lake / language / "raw"
        rows = _sql("""SELECT count(*), count(*) FILTER (status = 'success'),
                md5(string_agg(concat_ws('|', key, status, caption, md5(png)), ',' ORDER BY key))
            FROM read_parquet($files)""", {"files": sorted(str(p) for p in raw.glob("*.parquet"))})[0]
        return {"rows": rows[0], "success": rows[1], "md5": rows[2], "complete": len(list(raw.glob("*_stats.json")))}
    if stage == "filter":
        pairs = lake / language / "pairs"
        rows = _sql("""SELECT count(*), md5(string_agg(concat_ws('|', key, caption_en, caption, image_sha256), ','
                ORDER BY key)) FROM read_parquet($f)""", {"f": str(pairs / "pairs.parquet")})[0]
        return {"rows": rows[0], "md5": rows[1], "dropped": json.loads((pairs / "quality.json").read_text())["dropped"]}
    if stage == "embed":
        out = {}
        for store in _stores(work):
            parts = sorted(str(p) for p in store.glob("part-*.parquet"))
            if not parts:
                out[store.name] = {"rows": 0}
                continue
            columns = [c for c in pq.read_schema(parts[0]).names if c != "hash"]
            cells = " || ".join(f"md5({c})" for c in columns)
            rows = _sql(f"""SELECT count(*), count(DISTINCT hash), md5(string_agg(hash || ':' || {cells}, ','
                    ORDER BY hash)) FROM read_parquet($parts)""", {"parts": parts})[0]
            out[store.name] = {"rows": rows[0], "distinct": rows[1], "md5": rows[2]}
        return out
    if stage == "pack":
        shards = lake / language / "pairs" / "shards"
        roots = [p for p in shards.iterdir() if _visible(p)]
        return {"packs": len(roots), "files": {str(f.relative_to(shards)): _pack_file(f, root) for root in roots
                                               for f in sorted(root.rglob("*")) if f.is_file()}}
    if stage == "train":
        from safetensors.numpy import load_file

        files = sorted((lake / language / "runs" / "chaos" / "adapter").glob("*.safetensors"))
        return {"weights": {f"{f.name}:{k}": v.astype("float64").ravel().tolist()
                            for f in files for k, v in load_file(f).items()}}
    if stage == "evaluate":
        from pea.io import results

        evaluation = results.decode(json.loads((work / "trial" / "results" / language / "evaluate.json").read_text()))
        return {"metrics": evaluation.metrics()}
    return _registry(work, language)


def _registry(work: Path, language: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'trial' / 'tracking' / 'mlflow.db'}")
    name = f"pea-adapter-{language}"
    versions = client.search_model_versions(f"name = '{name}'")
    aliases = {alias: v.version for v in versions for alias in (v.aliases or [])}
    return {"versions": len(versions), "aliases": aliases, "all_ready": all(v.status == "READY" for v in versions)}


def _pack_file(f: Path, root: Path):
    """A pack file's bytes, but for a data file its rows' other columns (exactly) and its tensor columns as arrays:
    a row embedded again in another batch (a rerun embeds only what is missing) can differ from the reference in an
    encoder's last bit on some CPUs (seen for one VAE latent: 2 values of 256 by one fp16 step), which `same` allows."""
    if f.suffix != ".parquet":
        return hashlib.sha256(f.read_bytes()).hexdigest()
    dtypes = {name: meta["dtype"] for name, meta in json.loads((root / "index.json").read_text())["tensors"].items()}
    table = pq.read_table(f)
    tensors = [c for c in table.column_names if c in dtypes]
    rest = table.drop_columns(tensors).to_pylist()
    return {"rows": hashlib.sha256(repr(rest).encode()).hexdigest(),
            **{c: np.stack([np.frombuffer(v, dtypes[c]) for v in table[c].to_pylist()]).astype(np.float32)
               for c in tensors}}


def same(a, b) -> bool:
    """Equal, floats within TOLERANCE, stored tensors within TENSOR_TOLERANCE."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=TENSOR_TOLERANCE, atol=TENSOR_TOLERANCE))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOLERANCE
    return a == b


def inspect(work: Path) -> dict:
    """Visible files that cannot be read whole (a partial output under a final name), duplicate rows in the
    stores, model versions beyond the one registration, and temps left behind by killed writers."""
    lake, partial = _lake(work), []
    for path in lake.rglob("*"):
        if not path.is_file() or not _visible(path.relative_to(lake)):
            continue
        try:
            if path.suffix == ".parquet":
                pq.read_table(path, page_checksum_verification=True)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, ValueError) as err:
            partial.append(f"{path.relative_to(lake)}: {str(err).splitlines()[0][:80]}")
    duplicates = 0
    for store in _stores(work):
        parts = sorted(str(p) for p in store.glob("part-*.parquet"))
        if parts:
            duplicates += _sql("SELECT count(*) - count(DISTINCT hash) FROM read_parquet($p)", {"p": parts})[0][0]
    versions = _registry(work, "zh")["versions"] if (work / "trial" / "tracking" / "mlflow.db").exists() else 0
    temps = [p for p in (work / "trial").rglob("*") if ".tmp" in p.name or p.name.endswith(".pea-tmp")]
    return {"visible_partial": partial, "store_duplicates": duplicates, "extra_versions": max(0, versions - 1),
            "temps": len(temps)}
