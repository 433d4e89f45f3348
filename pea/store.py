"""A content-addressed tensor store: Parquet parts of (hash, named tensors) rows under one directory.

One store holds one kind of tensor made by one model under one setting (its *key*, recorded in
`store.json`); rows are addressed by the hash of their input (a normalized caption, an image hash),
so whatever is already stored is never computed again, by any language or any rerun. Tensors are
Arrow fixed-shape tensor columns in float16, or bfloat16 kept as its raw 16-bit pattern (Arrow has
no bfloat16). Each part is written under a temp name and renamed, so a killed writer loses at most
the part in flight and never leaves a partial one visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

ARROW_DTYPES = {"float16": pa.float16(), "bfloat16": pa.int16()}


def text_hash(text: str) -> str:
    """Hash of a caption after Unicode NFC and whitespace normalization."""
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class StoreMismatch(ValueError):
    pass


class TensorStore:
    def __init__(self, root: Path, key: dict, dtype: str):
        self.root = Path(root)
        self.key = {**key, "dtype": dtype}
        self.dtype = dtype
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "store.json"
        if manifest.is_file():
            stored = json.loads(manifest.read_text())
            if stored != self.key:
                raise StoreMismatch(
                    f"store {self.root} holds tensors made with {stored}, not {self.key}; "
                    "refusing to mix models, revisions or settings: use another store directory")
        else:
            tmp = manifest.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(self.key, indent=2, sort_keys=True))
            os.replace(tmp, manifest)

    @classmethod
    def open(cls, root: Path) -> TensorStore:
        """An existing store, with the key it was made with."""
        manifest = Path(root) / "store.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{root} is not a tensor store (no store.json); run the embed stage first")
        key = json.loads(manifest.read_text())
        return cls(root, key, key.pop("dtype"))

    def parts(self) -> list[str]:
        return sorted(str(p) for p in self.root.glob("part-*.parquet"))

    def hashes(self) -> set[str]:
        parts = self.parts()
        if not parts:
            return set()
        rows = duckdb.connect().execute("SELECT hash FROM read_parquet($parts)", {"parts": parts}).fetchall()
        return {row[0] for row in rows}

    def write(self, hashes: list[str], tensors: dict[str, torch.Tensor]) -> Path:
        """Store one row per hash; each named tensor (first dim = rows) becomes a tensor column."""
        columns = {"hash": pa.array(hashes, pa.string())}
        for name, tensor in tensors.items():
            tensor = tensor.detach().cpu()
            if self.dtype == "bfloat16":
                array = tensor.to(torch.bfloat16).view(torch.int16).numpy()
            else:
                array = tensor.to(torch.float16).numpy()
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.root / f".{name}.tmp"
        pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, self.root / name)
        return self.root / name

    def read(self, hashes: list[str]) -> dict[str, torch.Tensor]:
        """Every tensor column for `hashes`, rows in that order (float32); every hash must be stored."""
        parts = self.parts()
        found = ds.dataset(parts).to_table(filter=pc.field("hash").isin(list(set(hashes)))) if parts else None
        position = {h: i for i, h in enumerate(found.column("hash").to_pylist())} if found is not None else {}
        missing = [h for h in set(hashes) if h not in position]
        if missing:
            raise KeyError(f"{len(missing)} of {len(set(hashes))} inputs are missing from store {self.root}; "
                           "run the embed stage first")
        rows = pa.array([position[h] for h in hashes])
        out = {}
        for name in found.column_names:
            if name == "hash":
                continue
            array = found.column(name).combine_chunks().take(rows).to_numpy_ndarray()
            tensor = torch.from_numpy(np.array(array))  # a writable copy
            out[name] = (tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor).float()
        return out
