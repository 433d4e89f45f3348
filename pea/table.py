"""The held-out table that evaluation scores, the split rule, and the pairs' fingerprint.

A pair is held out when the hash of its caption pair falls in the spec's held-out share, so the split
is deterministic, stable across reruns and languages, and no held-out prompt is ever trained on.
Training never materialises its split: it streams packed shards (pea.shards, pea.reader). Evaluation
holds a bounded sample in memory: the pack's held-out split, at most `evaluate.heldout_rows` pairs.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pea.embed import EmbedResult
from pea.spec import LanguageSpec
from pea.store import CorruptPart, connect, decode_tensor, pair_hash, read_part

Split = Literal["train", "heldout"]
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


def is_heldout(caption_en: str, caption: str, percent: int) -> bool:
    """The split rule (pea.shards applies the same one in SQL)."""
    return int(pair_hash(caption_en, caption)[:8], 16) % 100 < percent


@dataclass
class TrainingTable:
    captions_en: list[str]
    captions: list[str]
    teacher: torch.Tensor                # (N, teacher tokens, teacher dim)
    teacher_pooled: torch.Tensor | None  # (N, pooled dim) for SDXL teachers
    student: torch.Tensor                # (N, student tokens, student dim)
    latents: torch.Tensor                # (N, C, h, w)
    native: torch.Tensor                 # (N,) 1 = native caption (diffusion loss), 0 = parallel pair (KD)
    teacher_empty: torch.Tensor          # the teacher's token encoding of "" (caption dropout, guidance)
    student_empty: torch.Tensor          # the student's encoding of ""

    def __len__(self) -> int:
        return len(self.captions)

    def with_english(self) -> TrainingTable:
        """The rows that have an English caption: a native-only row (caption_en '') has nothing of the teacher's
        to be compared with but its unconditional output, so evaluation and promotion never score it."""
        keep = [i for i, en in enumerate(self.captions_en) if en.strip()]
        if not keep:
            raise ValueError("no held-out pair has an English caption, so nothing can be compared with the teacher; "
                             "add parallel (caption_en) rows to the corpus")
        rows = torch.tensor(keep)
        return TrainingTable([self.captions_en[i] for i in keep], [self.captions[i] for i in keep],
                             self.teacher[rows], None if self.teacher_pooled is None else self.teacher_pooled[rows],
                             self.student[rows], self.latents[rows], self.native[rows], self.teacher_empty,
                             self.student_empty)


def load_table(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, split: Split = "heldout",
               packed=None) -> TrainingTable:
    """The held-out sample in memory, from `packed` (a pea.shards.Packed: opened, not made again) or else packing
    the shards first if needed; bounded by evaluate.heldout_rows."""
    from pea.shards import pack

    if split != "heldout":
        raise ValueError("only the held-out split is loaded whole; training streams its split (pea.reader)")
    shards = (packed or pack(spec, pairs_path, embedded)).heldout
    fs, root = shards.filesystem()
    try:
        table = read_part(f"{root}/{shards.files[0]}", filesystem=fs)
    except CorruptPart as err:
        raise CorruptPart(f"{err}; delete the pack folder {root} (the pack stage writes it again) and rerun") from err
    tensors = {name: decode_tensor(table.column(name), shape=shape, dtype=dtype).float()
               for name, (shape, dtype) in shards.tensors.items()}
    empty = shards.empty()
    return TrainingTable(
        captions_en=table.column("caption_en").to_pylist(), captions=table.column("caption").to_pylist(),
        teacher=tensors["teacher"], teacher_pooled=tensors.get("teacher_pooled"), student=tensors["student"],
        latents=tensors["latents"], native=torch.tensor(table.column("native").to_pylist(), dtype=torch.float32),
        teacher_empty=empty["teacher"], student_empty=empty["student"])
