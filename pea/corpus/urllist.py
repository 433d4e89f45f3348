"""The url list on disk: a folder of Parquet parts, written whole or not at all, with a content digest.

img2dataset takes the folder as its `url_list` (input_format parquet): it reads the parts in name order,
each one whole, and numbers its shards across them (ceil(rows / rows_per_shard) per part). A part holds
`PART_SHARDS` shards' rows, so every part but the last is a whole number of shards and the shard
numbering is the one a single file would give, while img2dataset never holds more than a part.

`PartWriter` writes parts of exactly `part_rows` rows (the last shorter), row groups of exactly
`group_rows` rows, each from one contiguous array: the bytes are then a function of the rows alone, and
the sha256 of each part, taken as it is written, is a digest of its content (no re-read, ever). The parts
go to a hidden folder beside the list, with the list's digest in `_digest` (img2dataset reads only
`*.parquet`, pyarrow skips `_` names); `publish` renames that folder into place only when it is complete
and its digest differs from the one in the folder already there, so a killed run never leaves a half list
visible, the digest always describes the parts beside it, and an unchanged list keeps its files (and their
mtimes) untouched.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_SHARDS = 100  # img2dataset shards per part: img2dataset reads a part whole, so this bounds its memory
GROUP_SHARDS = 10  # shards per row group (divides PART_SHARDS)
MAX_PARTS = 100_000  # part-00000 .. part-99999: img2dataset sorts the names as strings
DIGEST_FILE = "_digest"


@dataclass(frozen=True)
class Part:
    name: str
    rows: int
    bytes: int
    sha256: str


def digest(parts: list[Part]) -> str:
    """The list's digest: its parts' digests and row counts, in order."""
    return hashlib.sha256("".join(f"{p.rows} {p.sha256}\n" for p in parts).encode()).hexdigest()


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through it (Parquet is written front to back, no seeks)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file, self._hash, self.size = open(path, "wb"), hashlib.sha256(), 0  # noqa: SIM115 - closed in close()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class PartWriter:
    """Batches in, parts of `part_rows` rows out, under a hidden folder beside `out` until `publish`."""

    def __init__(self, out: Path, schema: pa.Schema, part_rows: int, group_rows: int) -> None:
        if part_rows % group_rows:
            raise ValueError(f"part_rows {part_rows} is not a multiple of group_rows {group_rows}")
        self.out, self.schema, self.part_rows, self.group_rows = Path(out), schema, part_rows, group_rows
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir(parents=True)
        self.parts: list[Part] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._sink: _HashingFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._part_rows = 0

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts) + self._part_rows + self._pending_rows

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._pending.append(batch.cast(self.schema))
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.group_rows:  # a table only once a whole row group is waiting
            table = pa.Table.from_batches(self._pending, self.schema)
            self._group(table.slice(0, self.group_rows))
            rest = table.slice(self.group_rows)
            self._pending, self._pending_rows = rest.to_batches(), rest.num_rows

    def _group(self, table: pa.Table) -> None:
        if self._writer is None:
            if len(self.parts) >= MAX_PARTS:
                raise ValueError(f"the url list {self.out} would need more than {MAX_PARTS} parts; raise "
                                 "corpus.rows_per_shard in the spec")
            self._sink = _HashingFile(self.tmp / f"part-{len(self.parts):05d}.parquet")
            self._writer = pq.ParquetWriter(self._sink, self.schema)
        # One contiguous chunk per column: page boundaries, hence bytes, then depend on the rows alone.
        self._writer.write_table(table.combine_chunks(), row_group_size=self.group_rows)
        self._part_rows += table.num_rows
        if self._part_rows == self.part_rows:
            self._close_part()

    def _close_part(self) -> None:
        self._writer.close()
        self._sink.close()
        name = f"part-{len(self.parts):05d}.parquet"
        self.parts.append(Part(name, self._part_rows, self._sink.size, self._sink.hexdigest()))
        self._writer, self._sink, self._part_rows = None, None, 0

    def finish(self) -> list[Part]:
        """Write what is buffered and close the last part; the parts stay hidden until `publish`."""
        if self._pending_rows:
            self._group(pa.Table.from_batches(self._pending, self.schema))
            self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            self._close_part()
        (self.tmp / DIGEST_FILE).write_text(digest(self.parts) + "\n")  # moves with the parts, in one rename
        return self.parts

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def same(out: Path, parts: list[Part]) -> bool:
    """The folder already holds this list: the same digest on record, and exactly these parts (names, sizes)."""
    record = out / DIGEST_FILE
    if not record.is_file() or record.read_text().strip() != digest(parts):
        return False
    names = sorted(p.name for p in out.glob("*.parquet"))
    return names == [p.name for p in parts] and all((out / p.name).stat().st_size == p.bytes for p in parts)


def publish(writer: PartWriter) -> bool:
    """Make the written parts the list at `writer.out`, unless the list there is the same (then its files stay
    untouched). True when the list was replaced."""
    parts, out = writer.parts, writer.out
    if same(out, parts):
        shutil.rmtree(writer.tmp)
        return False
    # A folder cannot replace a non-empty one in one rename: move the old list aside first. A kill between the
    # two renames leaves no list, never a mixed one; the next run writes it again.
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    if out.exists():
        os.replace(out, old)
    os.replace(writer.tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return True


def clear_leftovers(out: Path) -> None:
    """Hidden folders a killed run left beside the list (runs of one language never overlap)."""
    for stale in (*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
