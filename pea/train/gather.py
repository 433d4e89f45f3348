"""The pack's gather: every packed row's tensors from the stores, each store part read once, in any store layout.

    staging = Staging(folder, rows={"train": n, "heldout": m, "empty": 1})
    read = staging.scatter(con, "need_teacher", columns=("tokens", "pooled"))    # pass 1, once per store
    cells = staging.read("train", "tokens", start, count)                      # pass 2, in position order

A packed row sits at a position of its split (the pack's key order for train, pair-hash order for the held-out
sample), and its tensors sit at (part, row) of three stores whose order is whatever wrote them: one embed worker
writes its pairs in key order, N workers each write their own hash bucket in key order (so one chunk of 1,024
pairs is spread over about N parts of every store), and a store shared by languages (the English teacher's) is in
the order of whichever language embedded a caption first. No single order of the packed rows is sequential in all
three, and gathering in the pack's order with a few parts cached re-reads a part once per chunk that needs it
(≈ N× the bytes with N workers).

So the gather runs in two passes, as an external shuffle does:
1. scatter: for each store, DuckDB lists every needed (part, row) with its (split, position), grouped by part.
   Each part's tensor columns are read once (pyarrow, page checksums verified; only parts holding a needed row)
   and each needed row's raw bytes are written into a staging file per (split, column) at position × row width
   (`os.pwrite` of each run of consecutive positions; a part written in the pack's order is one run).
2. read: the pack writer reads each split's staging files front to back, chunk by chunk: sequential reads.

Bytes read from the stores: each needed part once (plus DuckDB's scan of the stores' hash column, 64 B a row). The
price is one write and one read of the packed tensors in the staging folder, on the pack's own disk, removed with
the pack's temp folder. Memory: one part of one store, and one chunk of rows in pass 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from pea.embed.store import CorruptPart, corrupt_parts

PARTS_PER_BATCH = 8  # parts' row lists fetched from DuckDB at once (each ~1,024 rows of ints)


class Staging:
    """Raw tensor cells of every packed row, by (split, column), at position × width in one file each."""

    def __init__(self, folder: Path, rows: dict[str, int]):
        self.folder, self.rows = Path(folder), dict(rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.widths: dict[str, int] = {}
        self._fds: dict[tuple[str, str], int] = {}
        self.parts_read: dict[str, int] = {}
        self.bytes_read: dict[str, int] = {}    # column-chunk bytes of the parts read, from their Parquet metadata

    def _fd(self, split: str, column: str) -> int:
        key = (split, column)
        if key not in self._fds:
            path = self.folder / f"{split}.{column}"
            self._fds[key] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fds[key]

    def scatter(self, con: duckdb.DuckDBPyConnection, need: str, store: str, columns: tuple[str, ...]) -> None:
        """Pass 1 for one store: `need` is a table (file, row, split, pos) of every cell the pack takes from it."""
        reader = con.sql(f"""SELECT file, list(row ORDER BY split, pos) AS rows, list(split ORDER BY split, pos)
                AS splits, list(pos ORDER BY split, pos) AS positions
            FROM {need} GROUP BY file ORDER BY file""").to_arrow_reader(PARTS_PER_BATCH)
        for batch in reader:
            for file, rows, splits, positions in zip(*(batch.column(i) for i in range(4))):
                self._scatter_part(store, file.as_py(), rows.values.to_numpy(),
                                   splits.values.to_numpy(zero_copy_only=False), positions.values.to_numpy(), columns)

    def _scatter_part(self, store: str, file: str, rows: np.ndarray, splits: np.ndarray, positions: np.ndarray,
                      columns: tuple[str, ...]) -> None:
        try:  # one open: the footer is read once, then the tensor columns, their page checksums verified
            with pq.ParquetFile(file, page_checksum_verification=True) as parquet:
                metadata = parquet.metadata
                present = [c for c in columns if c in metadata.schema.names]
                table = parquet.read(columns=present)
        except OSError as err:
            raise corrupt_parts([file], CorruptPart(f"{file} is corrupt ({err})")) from err
        self.parts_read[store] = self.parts_read.get(store, 0) + 1
        chunks = [metadata.row_group(g).column(i) for g in range(metadata.num_row_groups)
                  for i in range(metadata.num_columns)]
        self.bytes_read[store] = self.bytes_read.get(store, 0) + sum(
            c.total_compressed_size for c in chunks if c.path_in_schema in present)
        # Rows arrive sorted by (split, position): each split is one slice, and within it each run of consecutive
        # positions is one contiguous write.
        bounds = np.flatnonzero(splits[1:] != splits[:-1]) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(splits)]):
            split, where, at = str(splits[lo]), rows[lo:hi], positions[lo:hi]
            runs = np.r_[0, np.flatnonzero(np.diff(at) != 1) + 1, len(at)]
            for column in present:
                cells = table.column(column).combine_chunks().take(pa.array(where))
                width = cells.type.byte_width
                self.widths[column] = width
                data = memoryview(cells.buffers()[1])[cells.offset * width:(cells.offset + len(cells)) * width]
                fd = self._fd(split, column)
                for a, b in zip(runs[:-1], runs[1:]):  # one call per run: per row only where the orders disagree
                    _write_all(fd, data[a * width:b * width], int(at[a]) * width)

    def read(self, split: str, column: str, start: int, count: int) -> pa.FixedSizeBinaryArray:
        """Pass 2: the cells at positions [start, start + count) of a split, as one fixed-size binary array."""
        width = self.widths[column]
        data = _read_all(self._fd(split, column), count * width, start * width)
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), count, [None, pa.py_buffer(data)])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_chars() -> int | None:
    """Bytes this process has read so far, by the OS's count (Linux /proc/<pid>/io `rchar`, all threads, page cache
    hits included); None where the platform does not count them."""
    try:
        return psutil.Process().io_counters().read_chars
    except (AttributeError, NotImplementedError, psutil.Error):
        return None


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_all(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:  # a position no part filled: the staging file ends early
        raise KeyError(f"staging file read short ({len(data)} of {size} bytes at {offset}): a packed row has no "
                       "tensors in the stores; run the embed stage for these pairs first")
    return data
