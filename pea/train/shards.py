"""Training shards: the joined rows that training and evaluation read, packed once after embed.

    pack(spec, pairs_path, embedded) -> Packed      # Packed.train, Packed.heldout: Shards; Packed.fingerprint
    Packed.open(root) -> Packed                      # a pack another process made: nothing scanned or packed

A row is one pair joined with its tensors: pairs ⋈ teacher conditioning (+ pooled) ⋈ student states ⋈
latents, with the native flag and both captions. DuckDB places every packed pair (split, position) and joins it
with where each tensor is (part file, row: the stores' hash columns only) under its memory limit; pea.train.gather then
reads each store part that holds a needed row once, with pyarrow, as raw 16-bit bytes (pea.embed.store, never decoded),
whatever order and number of embed workers wrote the stores, through staging files the writer reads back in
order. The empty caption's two rows come through the same pass, by their location. Memory is one store part and a
chunk of GATHER_ROWS rows, whatever the corpus size; disk, the pack's size twice while it is written. What the gather
read (parts, and the bytes each store gave by the OS's count) goes to the caller's `stats`, not into the pack: the
pack stays a pure function of its inputs, whatever layout of the stores it was read from.

- `train/`: Parquet files of row groups of `train.data.row_group_rows` rows: the pairs in key order, shuffled
  within each chunk of GATHER_ROWS by a seeded permutation; a row group is the unit the streaming reader
  (pea.train.reader) shuffles and reads. A pack is a pure function of its inputs and immutable once written: every
  run and every resume of the same key reads the same rows in the same files.
- `heldout/`: a bounded, deterministic sample of the held-out pairs (at most `evaluate.heldout_rows`, the
  lowest pair hashes first), what evaluation and promotion score.
- `empty.safetensors`: the teacher's and the student's encodings of "" (caption dropout, guidance).
- `index.json`: the key, the pairs' fingerprint (data_fingerprint, scanned once: ranks, evaluation and
  registration read it here), the tensors' shapes and dtypes, every file's row-group sizes.
  Written last, inside a temp folder that is then renamed: a pack without it is never seen.

The folder is `<pairs dir>/shards/<key>/`, the key a digest of the pairs' content, the stores' keys and the
split settings, so a rerun or a run with other training settings reuses it, and new pairs or a new model
make a new pack. The reader opens files through pyarrow's or fsspec's filesystems, so a pack copied to
object storage (`s3://…`, `gs://…`) is read by the same code as a local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load, save_file

from pea.embed import EmbedResult
from pea.embed.store import TensorStore, decode_tensor, tensor_meta
from pea.io.atomic import is_no_room, no_room, sweep, temp_path
from pea.io.keys import connect, key_digest, text_hash
from pea.spec import LanguageSpec
from pea.train.gather import Staging, read_chars

FORMAT = 2  # bump when the layout of a pack changes (2: rows shuffled within each gathered chunk)


@dataclass(frozen=True)
class Shards:
    """One split of a pack, as its index.json describes it."""

    root: str                                   # a local path or an fsspec/pyarrow URL
    rows: int
    files: tuple[str, ...]                      # relative to root
    row_groups: tuple[tuple[int, ...], ...]     # rows of each row group, per file
    tensors: dict[str, tuple[tuple[int, ...], str]]  # column -> (shape, dtype)

    @classmethod
    def open(cls, root: str | Path, split: str) -> Shards:
        """A split of a complete pack at `root` (local path or URL)."""
        fs, path = fsspec.core.url_to_fs(str(root))
        index_path = f"{path.rstrip('/')}/index.json"
        if not fs.exists(index_path):
            raise FileNotFoundError(f"{root} is not a complete pack of training shards (no index.json); "
                                    "run the pack stage (pea.train.shards.pack) after embed")
        with fs.open(index_path, "r") as f:
            index = json.load(f)
        part = index["splits"][split]
        return cls(str(root).rstrip("/") + "/" + split, part["rows"], tuple(f["path"] for f in part["files"]),
                   tuple(tuple(f["row_groups"]) for f in part["files"]),
                   {k: (tuple(v["shape"]), v["dtype"]) for k, v in index["tensors"].items()})

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """pyarrow's own filesystem for local paths, s3:// and gs://; any other fsspec URL through fsspec."""
        try:
            return pafs.FileSystem.from_uri(self.root if "://" in self.root else os.path.abspath(self.root))
        except pa.ArrowInvalid:  # a scheme pyarrow has no filesystem for (memory://, hf://, ...)
            fs, path = fsspec.core.url_to_fs(self.root)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    def empty(self) -> dict[str, torch.Tensor]:
        """{"teacher": the teacher's tokens for "", "student": the student's states for ""} in float32."""
        fs, path = fsspec.core.url_to_fs(self.root.rsplit("/", 1)[0] + "/empty.safetensors")
        with fs.open(path, "rb") as f:
            return load(f.read())


@dataclass(frozen=True)
class Packed:
    root: Path
    train: Shards
    heldout: Shards
    fingerprint: str = ""  # the pairs' data_fingerprint, as the pack's index records it

    @classmethod
    def open(cls, root: str | Path) -> Packed:
        """The complete pack at `root`, as a launcher or an earlier stage made it: nothing is scanned or packed
        again (what training ranks, evaluate and register do with the root they are handed)."""
        train = Shards.open(root, "train")
        fs, path = fsspec.core.url_to_fs(str(root))
        with fs.open(f"{path.rstrip('/')}/index.json", "r") as f:
            index = json.load(f)
        return cls(Path(root), train, Shards.open(root, "heldout"), index.get("fingerprint", index["key"]["pairs"]))


PACKED_COLUMNS = ("key", "image_sha256", "caption_en", "caption", "native")  # what pack reads of the pairs


def data_fingerprint(pairs_path: Path) -> str:
    """A digest of the pairs' content, independent of file layout and row order, computed inside DuckDB: the count,
    the XOR and the sum of each row's MD5 (a duplicated row changes the sum even where the XORs cancel). A row is
    every column that changes what pack writes (key, image hash, both captions, the native flag; those a table has),
    as JSON, so a NULL differs from '' and no value can run into the next; changing only which rows are native
    changes it."""
    spill = Path(pairs_path).parent / f".duckdb-{uuid.uuid4().hex}.tmp"
    con = connect(spill)
    try:
        has = {row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet($p)", {"p": str(pairs_path)})
               .fetchall()}
        fields = ", ".join(f"'{c}': \"{c}\"" for c in PACKED_COLUMNS if c in has)  # names of our own: no injection
        row = con.execute(f"""SELECT count(*), bit_xor(md5_number(r)), sum(md5_number_lower(r)::HUGEINT)
            FROM (SELECT to_json({{{fields}}})::VARCHAR AS r FROM read_parquet($p))""",
                          {"p": str(pairs_path)}).fetchall()[0]
    finally:
        con.close()
    return hashlib.sha256(repr(row).encode()).hexdigest()[:16]


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(pairs_path: Path) -> str:
    """data_fingerprint of the pairs, scanned once per version of the file in this process (a stage
    result or a cache key asks again and gets the same answer): keyed by the file's identity (path, device, inode,
    size, modification time in ns). The filter stage replaces pairs.parquet by rename, so a new table is a new
    inode; a table rewritten in place keeps neither its size nor its mtime. Other processes get the fingerprint
    from the pack's index (Packed.open)."""
    stat = os.stat(pairs_path)
    identity = (os.path.realpath(pairs_path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity not in _FINGERPRINTS:
        _FINGERPRINTS[identity] = data_fingerprint(Path(pairs_path))
    return _FINGERPRINTS[identity]


def pack_key(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult) -> dict:
    stores = {name: TensorStore.open(root).key for name, root in
              (("teacher", embedded.teacher_store), ("student", embedded.student_store),
               ("latents", embedded.latent_store))}
    return {"format": FORMAT, "pairs": fingerprint(pairs_path), "stores": stores,
            "heldout_percent": spec.evaluate.heldout_percent, "heldout_rows": spec.evaluate.heldout_rows,
            "row_group_rows": spec.train.data.row_group_rows}


ROW_GROUPS_PER_FILE = 8     # 8 × 256 SD 1.5 rows ≈ 630 MB per file: few files, each still a cheap retry
GATHER_ROWS = 1024          # packed rows read back from staging, shuffled and written at once
STORES = {"teacher": ("teacher_store", ("tokens", "pooled")), "student": ("student_store", ("states",)),
          "latents": ("latent_store", ("latents",))}
OUT_NAMES = {"tokens": "teacher", "pooled": "teacher_pooled", "states": "student", "latents": "latents"}
META = ("key", "caption_en", "caption", "native", "pair_hash")


def _parts(root: Path) -> str:
    parts = TensorStore.open(root).parts()
    if not parts:
        raise FileNotFoundError(f"store {root} is empty; run the embed stage first")
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in parts) + "]"


def _write(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, out: Path) -> tuple[dict, dict]:
    """Both splits' row groups into `out`, the empty caption's tensors into `out/empty.safetensors`; returns the
    splits' file listing and what the gather read (pea.train.gather: each store part once, whatever wrote the stores)."""
    spill = spec.corpus.duckdb.spill(out, f"spill-{os.getpid()}")
    con = connect(spill, spec.corpus.duckdb.memory_limit)
    staging = None
    try:
        heldout = f"('0x' || pair_hash[1:8])::BIGINT % 100 < {spec.evaluate.heldout_percent}"
        # Every packed row with its split and position: the train split in key order (the order the pack has always
        # had), the held-out sample by pair hash, cut at evaluate.heldout_rows.
        con.execute(f"""CREATE TEMP TABLE placed AS
            WITH pairs AS (SELECT key, caption_en, caption, native, image_sha256,
                    pea_text_hash(caption_en) AS teacher_hash, pea_text_hash(caption) AS student_hash,
                    pea_pair_hash(caption_en, caption) AS pair_hash FROM read_parquet($p))
            SELECT *, 'train' AS split, row_number() OVER (ORDER BY key, pair_hash, image_sha256) - 1 AS pos
            FROM pairs WHERE NOT {heldout}
            UNION ALL
            SELECT * FROM (SELECT *, 'heldout' AS split, row_number() OVER (ORDER BY pair_hash, key) - 1 AS pos
                           FROM pairs WHERE {heldout}) WHERE pos < {spec.evaluate.heldout_rows}""",
                    {"p": str(pairs_path)})
        rows = dict(con.execute("SELECT split, count(*) FROM placed GROUP BY split").fetchall())
        for split in ("train", "heldout"):
            if not rows.get(split):
                raise ValueError(f"the {split} split of {pairs_path} is empty; acquire more pairs or change "
                                 "evaluate.heldout_percent in the spec")
        staging = Staging(out / ".staging", {**rows, "empty": 1})
        empty, read = text_hash(""), {}
        for name, (field, columns) in STORES.items():
            before = read_chars()
            # Where each hash's tensors are (one location per hash: a duplicate row is never read): the stores'
            # hash column only, never their tensors.
            con.execute(f"""CREATE TEMP TABLE {name}_at AS SELECT hash, min(filename) AS file,
                    arg_min(file_row_number, filename) AS row
                FROM read_parquet({_parts(getattr(embedded, field))}, filename = true, file_row_number = true)
                GROUP BY hash""")
            column = {"teacher": "teacher_hash", "student": "student_hash", "latents": "image_sha256"}[name]
            missing = con.execute(f"SELECT count(*) FROM placed p ANTI JOIN {name}_at a ON a.hash = p.{column}"
                                  ).fetchall()[0][0]
            if missing:
                raise KeyError(f"{missing} pairs of {pairs_path} have no {name} tensors in {getattr(embedded, field)}; "
                               "run the embed stage for these pairs first")
            also = (f"UNION ALL SELECT file, row, 'empty', 0 FROM {name}_at WHERE hash = '{empty}'"
                    if name != "latents" else "")
            con.execute(f"""CREATE TEMP TABLE need_{name} AS SELECT a.file, a.row, p.split, p.pos FROM placed p
                JOIN {name}_at a ON a.hash = p.{column} {also}""")
            if name != "latents" and not con.execute(f"SELECT count(*) FROM need_{name} WHERE split = 'empty'"
                                                     ).fetchall()[0][0]:
                raise KeyError(f"the empty caption is missing from store {getattr(embedded, field)}; run the embed "
                               "stage first (it always stores it)")
            staging.scatter(con, f"need_{name}", name, columns)
            con.execute(f"DROP TABLE need_{name}")
            read[name] = None if before is None else read_chars() - before
        written = {}
        for split in ("train", "heldout"):
            batches = _with_tensors(staging, split, con.sql(
                f"SELECT {', '.join(META)} FROM placed WHERE split = '{split}' ORDER BY pos"
            ).to_arrow_reader(GATHER_ROWS), shuffle=split == "train")
            written[split] = _write_row_groups(batches, out / split, spec.train.data.row_group_rows
                                               if split == "train" else spec.evaluate.heldout_rows)
        empty_tensors = {"teacher": staging.read("empty", "tokens", 0, 1),
                         "student": staging.read("empty", "states", 0, 1)}
        tensors = {}
        for field, columns in STORES.values():  # shapes and dtypes as the stores record them
            schema = pq.read_schema(TensorStore.open(getattr(embedded, field)).parts()[0])
            for column in (c for c in columns if c in schema.names):
                shape, dtype = tensor_meta(schema.field(column))
                tensors[OUT_NAMES[column]] = {"shape": list(shape), "dtype": dtype}
        save_file({name: decode_tensor(cells, shape=tuple(tensors[name]["shape"]), dtype=tensors[name]["dtype"])[0]
                   .float().contiguous() for name, cells in empty_tensors.items()}, out / "empty.safetensors")
        # What the stores gave: the bytes this process read while locating and gathering each store (the OS's
        # count: hash columns, Parquet footers, tensor columns), and the packed rows' tensor bytes they became.
        packed = sum(staging.widths[c] * (rows["train"] + rows["heldout"]) for c in staging.widths)
        gathered = {"read_bytes": read, "packed_bytes": packed, "parts_read": staging.parts_read,
                    "column_bytes_read": staging.bytes_read}
    finally:
        if staging is not None:
            staging.close()
            shutil.rmtree(staging.folder, ignore_errors=True)
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    for split in ("train", "heldout"):
        if written[split] != rows[split]:
            raise KeyError(f"{rows[split] - written[split]} {split} pairs of {pairs_path} were not packed")
    splits = {split: {"rows": written[split], "files": [
        {"path": f.name, "row_groups": [md.row_group(i).num_rows for i in range(md.num_row_groups)]}
        for f in sorted((out / split).glob("*.parquet")) if (md := pq.read_metadata(f)).num_rows]}
        for split in ("train", "heldout")}
    return {"tensors": tensors, "splits": splits}, gathered


def _with_tensors(staging: Staging, split: str, batches: pa.RecordBatchReader, shuffle: bool):
    """Each batch of placed pairs (in position order) with its tensor columns read back from staging; with
    `shuffle`, its rows in a seeded random order. Pairs arrive in key order (manifest order, sometimes sorted by
    topic or source), so without it a row group would hold neighbours; the reader only shuffles whole row groups
    and rows within a few of them. The seed is the batch's index: the pack stays a pure function of its inputs."""
    start = 0
    for index, batch in enumerate(batches):
        columns = {name: batch.column(name) for name in META}
        for store_columns in (c for _, c in STORES.values()):
            for column in (c for c in store_columns if c in staging.widths):
                columns[OUT_NAMES[column]] = staging.read(split, column, start, batch.num_rows)
        start += batch.num_rows
        out = pa.RecordBatch.from_pydict(columns)
        yield out.take(np.random.default_rng([FORMAT, index]).permutation(out.num_rows)) if shuffle else out


def _write_row_groups(batches, folder: Path, rows: int) -> int:
    """Row groups of exactly `rows` rows (the last may be shorter), ROW_GROUPS_PER_FILE to a file."""
    folder.mkdir()
    pending: list[pa.RecordBatch] = []
    writer, files, groups, total = None, 0, 0, 0

    def emit(table: pa.Table) -> None:
        nonlocal writer, files, groups
        if writer is None:
            writer = pq.ParquetWriter(folder / f"data_{files:06d}.parquet", table.schema, compression="none",
                                      write_page_checksum=True)  # verified by every reader (pea.train.reader)
        writer.write_table(table, row_group_size=rows)
        groups += 1
        if groups == ROW_GROUPS_PER_FILE:
            writer.close()
            writer, files, groups = None, files + 1, 0

    for batch in batches:
        pending.append(batch)
        total += batch.num_rows
        buffered = pa.Table.from_batches(pending)
        while buffered.num_rows >= rows:
            emit(buffered.slice(0, rows))
            buffered = buffered.slice(rows)
        pending = buffered.to_batches()
    if pending and (rest := pa.Table.from_batches(pending)).num_rows:
        emit(rest)
    if writer is not None:
        writer.close()
    return total


def pack(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, stats: dict | None = None) -> Packed:
    """Pack the pairs' training and held-out rows once (reused while the key holds). `stats`, when packed here, is
    filled with what the gather read: read_bytes (per store, the OS's count), packed_bytes, parts_read."""
    pairs_path = Path(pairs_path)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs table {pairs_path} does not exist; run the filter and embed stages first")
    key = pack_key(spec, pairs_path, embedded)
    root = pairs_path.parent / "shards" / key_digest(key)
    if not (root / "index.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        sweep(root.parent)  # packs a killed run left half-written (older than an hour: not a live rank's)
        tmp = temp_path(root)
        tmp.mkdir()
        try:
            written, gathered = _write(spec, pairs_path, embedded, tmp)
            if stats is not None:
                stats.update(gathered)
            (tmp / "index.json").write_text(json.dumps({"key": key, "fingerprint": key["pairs"], **written},
                                                       indent=1))
            try:
                os.rename(tmp, root)
            except OSError:  # another process (a rank) packed the same key first: its pack is the one
                if not (root / "index.json").is_file():
                    raise
        except OSError as err:
            if is_no_room(err):
                raise no_room("pack: training shards", root, err) from err
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Packed.open(root)
