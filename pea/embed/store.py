"""A content-addressed tensor store: Parquet parts of (hash, named tensors) rows under one directory.

One store holds one kind of tensor made by one model under one setting (its *key*, recorded in
`store.json`); rows are addressed by the hash of their input (a normalized caption, an image hash),
so whatever is already stored is never computed again, by any language or any rerun. Each tensor is
one fixed-size binary cell of its raw little-endian float16 or bfloat16 bytes (Arrow and DuckDB have
no bfloat16, and DuckDB reads Arrow's float16 tensors as float32 lists), with its shape and dtype in
the Parquet field metadata: DuckDB then joins the stores into training shards (pea.train.shards) by copying
bytes, and every reader decodes a column with one `np.frombuffer`. Each part is written under a temp
name and renamed, so a killed writer loses at most the part in flight and never leaves a partial one
visible.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pea.io.atomic import publish, sweep

if TYPE_CHECKING:
    import torch

FORMAT = 2  # 1: Arrow fixed-shape tensor columns; 2: raw 16-bit bytes per cell (part of every store key)


def _torch_dtype(dtype: str) -> torch.dtype:
    # torch on first use only: `connect` also serves stages without tensors (manifests), which should not load it
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class StoreMismatch(ValueError):
    pass


class CorruptPart(OSError):
    """A Parquet part whose pages fail their checksums (or cannot be decoded)."""


# Parquet's page CRCs, verified on read: without this pyarrow returns a flipped byte as data (DuckDB never checks
# them, so tensors are read through pyarrow only).
CHECKED = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
QUARANTINE = "corrupt"


def read_part(path: str | Path, columns: list[str] | None = None, filesystem=None) -> pa.Table:
    """One Parquet part (a store part or a shard file) with its page checksums verified; CorruptPart names it."""
    try:
        return pq.read_table(path, columns=columns, filesystem=filesystem, page_checksum_verification=True)
    except OSError as err:
        raise CorruptPart(f"{path} is corrupt ({err})") from err


def _intact(path: str | Path) -> bool:
    try:
        read_part(path)
        return True
    except CorruptPart:
        return False


def corrupt_parts(parts: list[str | Path], err: BaseException) -> CorruptPart:
    """Move corrupt store parts aside (into `<store>/corrupt/`, kept for inspection) and say so: their rows are
    missing from then on, so the next embed computes them again."""
    moved = []
    for path in map(Path, parts):
        target = path.parent / QUARANTINE / path.name
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        moved.append(str(target))
    return CorruptPart(f"store part(s) failed their checksums ({str(err).splitlines()[0]}) and were moved aside: "
                       f"{', '.join(moved)}. Rerun: the embed stage computes their rows again")


class TensorStore:
    def __init__(self, root: Path, key: dict, dtype: str):
        self.root = Path(root)
        self.key = {**key, "dtype": dtype}
        self.dtype = dtype
        self.root.mkdir(parents=True, exist_ok=True)
        sweep(self.root)  # parts a killed writer left half-written (older than an hour: not a live writer's)
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
        """Store one row per hash; each named tensor (first dim = rows) becomes a binary tensor column."""
        fields, arrays = [pa.field("hash", pa.string())], [pa.array(hashes, pa.string())]
        for name, tensor in tensors.items():
            array, field = encode_tensor(name, tensor, self.dtype)
            fields.append(field)
            arrays.append(array)
        path = self.root / f"part-{uuid.uuid4().hex}.parquet"
        with publish(path, f"embed: {self.root.parent.name} store part") as tmp:
            # Page checksums: a flipped bit on disk is refused by name where tensors are read (read_part).
            pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), tmp, write_page_checksum=True)
        return path

    def read(self, hashes: list[str]) -> dict[str, torch.Tensor]:
        """Every tensor column for `hashes`, rows in that order (float32); every hash must be stored."""
        parts = self.parts()
        found = None
        if parts:
            try:
                found = ds.dataset(parts, format=CHECKED).to_table(filter=pc.field("hash").isin(list(set(hashes))))
            except OSError as err:
                bad = [p for p in parts if not _intact(p)]
                raise corrupt_parts(bad or parts, err) from err
        position = {h: i for i, h in enumerate(found.column("hash").to_pylist())} if found is not None else {}
        missing = [h for h in set(hashes) if h not in position]
        if missing:
            raise KeyError(f"{len(missing)} of {len(set(hashes))} inputs are missing from store {self.root}; "
                           "run the embed stage first")
        rows = pa.array([position[h] for h in hashes])
        return {f.name: decode_tensor(found.column(f.name).combine_chunks().take(rows), f).float()
                for f in found.schema if f.name != "hash"}


def encode_tensor(name: str, tensor: torch.Tensor, dtype: str) -> tuple[pa.Array, pa.Field]:
    """(rows, *shape) → one fixed-size binary cell per row holding its raw `dtype` bytes, and the field
    that records the shape and dtype."""
    import torch

    tensor = tensor.detach().to("cpu", _torch_dtype(dtype)).contiguous()
    rows, shape = tensor.shape[0], tuple(tensor.shape[1:])
    raw = tensor.view(torch.int16).numpy()  # numpy has no bfloat16: carry the 16-bit patterns
    width = raw[:1].nbytes if rows else int(np.prod(shape)) * 2
    array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), rows, [None, pa.py_buffer(raw)])
    return array, pa.field(name, pa.binary(width), metadata={"shape": json.dumps(shape), "dtype": dtype})


def tensor_meta(field: pa.Field) -> tuple[tuple[int, ...], str]:
    meta = field.metadata or {}
    if b"shape" not in meta:
        raise ValueError(f"column {field.name!r} carries no tensor shape; it was not written by pea.embed.store")
    return tuple(json.loads(meta[b"shape"])), meta[b"dtype"].decode()


def decode_tensor(array: pa.Array, field: pa.Field | None = None, shape: tuple[int, ...] | None = None,
                  dtype: str | None = None) -> torch.Tensor:
    """A binary column of raw 16-bit tensors (fixed-size, or variable binary) → a (rows, *shape) tensor in its
    stored dtype, without a per-row Python loop."""
    if field is not None:
        shape, dtype = tensor_meta(field)
    return as_tensor(decode_raw(array, shape).copy(), dtype)  # a writable copy


def as_tensor(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """16-bit patterns (int16, from decode_raw) → a tensor of `dtype`, sharing the memory."""
    import torch

    return torch.from_numpy(raw).view(_torch_dtype(dtype))


def decode_raw(array: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """The cells' 16-bit patterns as a read-only (rows, *shape) int16 view of the Arrow buffer (numpy only: a
    reader thread must not start torch's intra-op threads, which spin against the training step's)."""
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    n = len(array)
    width = int(np.prod(shape)) * 2
    if pa.types.is_fixed_size_binary(array.type):
        data = np.frombuffer(array.buffers()[1], np.uint8, n * width, array.offset * width)
    else:  # variable binary: one contiguous data buffer when every cell has the same width
        offsets = np.frombuffer(array.buffers()[1], np.int64 if pa.types.is_large_binary(array.type) else np.int32,
                                n + 1, array.offset)
        if n and (np.diff(offsets) != width).any():
            raise ValueError(f"a tensor cell is not {width} bytes ({shape} of 16-bit values); the shard is corrupt")
        data = np.frombuffer(array.buffers()[2], np.uint8, n * width, int(offsets[0]) if n else 0)
    return data.view(np.int16).reshape(n, *shape)
