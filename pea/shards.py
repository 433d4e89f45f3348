"""Training shards: the joined rows that training and evaluation read, packed once after embed.

    pack(spec, pairs_path, embedded) -> Packed      # Packed.train, Packed.heldout: Shards

A row is one pair joined with its tensors: pairs ⋈ teacher conditioning (+ pooled) ⋈ student states ⋈
latents, with the native flag and both captions. DuckDB joins the pairs with where each tensor is (part file,
row: the stores' hash columns only) under its memory limit, and the tensors are then gathered part by part
with pyarrow as raw 16-bit bytes (pea.store), never decoded. Memory is a chunk of GATHER_ROWS pairs plus
PARTS_CACHED parts per store, whatever the corpus size.

- `train/`: Parquet files of row groups of `train.data.row_group_rows` rows: the pairs in key order, shuffled
  within each chunk of GATHER_ROWS by a seeded permutation; a row group is the unit the streaming reader
  (pea.reader) shuffles and reads. A pack is a pure function of its inputs and immutable once written: every
  run and every resume of the same key reads the same rows in the same files.
- `heldout/`: a bounded, deterministic sample of the held-out pairs (at most `evaluate.heldout_rows`, the
  lowest pair hashes first), what evaluation and promotion score.
- `empty.safetensors`: the teacher's and the student's encodings of "" (caption dropout, guidance).
- `index.json`: the key, the tensors' shapes and dtypes, every file's row-group sizes. Written last, inside
  a temp folder that is then renamed: a pack without it is never seen.

The folder is `<pairs dir>/shards/<key>/`, the key a digest of the pairs' content, the stores' keys and the
split settings, so a rerun or a run with other training settings reuses it, and new pairs or a new model
make a new pack. The reader opens files through pyarrow's or fsspec's filesystems, so a pack copied to
object storage (`s3://…`, `gs://…`) is read by the same code as a local one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load, save_file

from pea.embed import EmbedResult
from pea.spec import LanguageSpec
from pea.atomic import is_no_room, no_room, sweep, temp_path
from pea.store import CorruptPart, TensorStore, connect, corrupt_parts, key_digest, read_part, tensor_meta, text_hash

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
                                    "run the pack stage (pea.shards.pack) after embed")
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


def pack_key(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult) -> dict:
    from pea.table import data_fingerprint

    stores = {name: TensorStore.open(root).key for name, root in
              (("teacher", embedded.teacher_store), ("student", embedded.student_store),
               ("latents", embedded.latent_store))}
    return {"format": FORMAT, "pairs": data_fingerprint(pairs_path), "stores": stores,
            "heldout_percent": spec.evaluate.heldout_percent, "heldout_rows": spec.evaluate.heldout_rows,
            "row_group_rows": spec.train.data.row_group_rows}


ROW_GROUPS_PER_FILE = 8     # 8 × 256 SD 1.5 rows ≈ 630 MB per file: few files, each still a cheap retry
GATHER_ROWS = 1024          # pairs whose tensors are gathered at once
PARTS_CACHED = 3            # store parts kept open per store between chunks (rows near each other share parts)
STORES = {"teacher": ("teacher_store", ("tokens", "pooled")), "student": ("student_store", ("states",)),
          "latents": ("latent_store", ("latents",))}
OUT_NAMES = {"tokens": "teacher", "pooled": "teacher_pooled", "states": "student", "latents": "latents"}


def _parts(root: Path) -> str:
    parts = TensorStore.open(root).parts()
    if not parts:
        raise FileNotFoundError(f"store {root} is empty; run the embed stage first")
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in parts) + "]"


class _Gather:
    """The tensors of pairs, store by store, from their (part file, row) locations. DuckDB would join the tensors
    itself, but a join whose sides carry ~300 KB rows holds one side in memory (measured: out of memory at 40,000
    SD 1.5 pairs under a 3.7 GB limit), so DuckDB joins only the small location columns and this reads each part's
    tensor column with pyarrow, keeping the last PARTS_CACHED parts. Embed writes stores in pair order, so the
    pairs of one chunk sit in a few consecutive parts and each part is read about once."""

    def __init__(self, columns: tuple[str, ...]):
        self.columns, self.cache = columns, {}

    def part(self, file: str) -> pa.Table:
        if file not in self.cache:
            schema = pq.read_schema(file)
            try:
                self.cache[file] = read_part(file, columns=[c for c in self.columns if c in schema.names])
            except CorruptPart as err:
                raise corrupt_parts([file], err) from err
            while len(self.cache) > PARTS_CACHED:
                self.cache.pop(next(iter(self.cache)))
        return self.cache[file]

    def __call__(self, files: pa.Array, rows: pa.Array) -> dict[str, pa.Array]:
        """Each column's cell for (files[i], rows[i]), in that order."""
        pieces, order = [], []
        for file in pc.unique(files).to_pylist():
            where = pc.indices_nonzero(pc.equal(files, file))
            pieces.append(self.part(file).take(pc.take(rows, where)))
            order.append(where)
        back = pc.sort_indices(pa.concat_arrays(order))  # from file-grouped order back to the chunk's order
        table = pa.concat_tables(pieces).take(back)
        return {name: table.column(name).combine_chunks() for name in table.column_names}


def _write(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, out: Path) -> dict:
    spill = spec.corpus.duckdb.spill(out, f"spill-{os.getpid()}")
    con = connect(spill, spec.corpus.duckdb.memory_limit)
    try:
        con.execute("""CREATE TEMP TABLE pairs AS SELECT key, caption_en, caption, native, image_sha256,
                pea_text_hash(caption_en) AS teacher_hash, pea_text_hash(caption) AS student_hash,
                pea_pair_hash(caption_en, caption) AS pair_hash
            FROM read_parquet($p)""", {"p": str(pairs_path)})
        for name, (field, _) in STORES.items():  # where each hash's tensors are: the hash column only, not tensors
            con.execute(f"""CREATE TEMP TABLE {name}_at AS SELECT hash, min(filename) AS file,
                    arg_min(file_row_number, filename) AS row
                FROM read_parquet({_parts(getattr(embedded, field))}, filename = true, file_row_number = true)
                GROUP BY hash""")
        heldout = f"('0x' || p.pair_hash[1:8])::BIGINT % 100 < {spec.evaluate.heldout_percent}"
        located = """SELECT p.key, p.caption_en, p.caption, p.native, p.pair_hash, t.file AS teacher_file,
                t.row AS teacher_row, s.file AS student_file, s.row AS student_row, l.file AS latents_file,
                l.row AS latents_row
            FROM pairs p JOIN teacher_at t ON t.hash = p.teacher_hash JOIN student_at s ON s.hash = p.student_hash
            JOIN latents_at l ON l.hash = p.image_sha256"""
        counts = dict(con.execute(f"SELECT {heldout}, count(*) FROM pairs p GROUP BY ALL").fetchall())
        written = {}
        # The train split in pair order (the stores' order: sequential reads); the held-out sample by pair hash.
        for split, query in (("train", f"{located} WHERE NOT {heldout} ORDER BY p.key"),
                             ("heldout", f"{located} WHERE {heldout} ORDER BY p.pair_hash, p.key "
                                         f"LIMIT {spec.evaluate.heldout_rows}")):
            rows = spec.train.data.row_group_rows if split == "train" else spec.evaluate.heldout_rows
            written[split] = _write_row_groups(_with_tensors(con.sql(query).to_arrow_reader(GATHER_ROWS),
                                                             shuffle=split == "train"), out / split, rows)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    expected = {"train": counts.get(False, 0), "heldout": min(counts.get(True, 0), spec.evaluate.heldout_rows)}
    for split in ("train", "heldout"):
        if written[split] != expected[split]:
            raise KeyError(f"{expected[split] - written[split]} {split} pairs of {pairs_path} have no tensors in "
                           "the stores; run the embed stage for these pairs first")
        if not written[split]:
            raise ValueError(f"the {split} split of {pairs_path} is empty; acquire more pairs or change "
                             "evaluate.heldout_percent in the spec")
    return {split: {"rows": written[split], "files": [
        {"path": f.name, "row_groups": [md.row_group(i).num_rows for i in range(md.num_row_groups)]}
        for f in sorted((out / split).glob("*.parquet")) if (md := pq.read_metadata(f)).num_rows]}
        for split in ("train", "heldout")}


def _with_tensors(batches: pa.RecordBatchReader, shuffle: bool):
    """Each batch of located pairs with its tensor columns in place of the locations; with `shuffle`, its rows in
    a seeded random order. Pairs arrive in key order (manifest order, sometimes sorted by topic or source), so
    without it a row group would hold neighbours; the reader only shuffles whole row groups and rows within a
    few of them. The seed is the batch's index: the pack stays a pure function of its inputs."""
    gathers = {name: _Gather(columns) for name, (_, columns) in STORES.items()}
    for index, batch in enumerate(batches):
        columns = {name: batch.column(name) for name in ("key", "caption_en", "caption", "native", "pair_hash")}
        for name, gather in gathers.items():
            for column, cells in gather(batch.column(f"{name}_file"), batch.column(f"{name}_row")).items():
                columns[OUT_NAMES[column]] = cells
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
                                      write_page_checksum=True)  # verified by every reader (pea.reader)
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


def pack(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult) -> Packed:
    """Pack the pairs' training and held-out rows once (reused while the key holds)."""
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
            splits = _write(spec, pairs_path, embedded, tmp)
            tensors = {}
            for field, columns in STORES.values():  # shapes and dtypes as the stores record them
                schema = pq.read_schema(TensorStore.open(getattr(embedded, field)).parts()[0])
                for column in (c for c in columns if c in schema.names):
                    shape, dtype = tensor_meta(schema.field(column))
                    tensors[OUT_NAMES[column]] = {"shape": list(shape), "dtype": dtype}
            empty = {"teacher": TensorStore.open(embedded.teacher_store).read([text_hash("")])["tokens"][0],
                     "student": TensorStore.open(embedded.student_store).read([text_hash("")])["states"][0]}
            save_file(empty, tmp / "empty.safetensors")
            (tmp / "index.json").write_text(json.dumps({"key": key, "tensors": tensors, "splits": splits}, indent=1))
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
    return Packed(root, Shards.open(root, "train"), Shards.open(root, "heldout"))
