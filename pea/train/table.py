"""The held-out table that evaluation scores, and the split rule.

A pair is held out when the hash of its caption pair falls in the spec's held-out share, so the split
is deterministic, stable across reruns and languages, and no held-out prompt is ever trained on.
Training never materialises its split: it streams packed shards (pea.train.shards, pea.train.reader). Evaluation
holds a bounded sample in memory: the pack's held-out split, at most `evaluate.heldout_rows` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pea.embed import EmbedResult
from pea.embed.store import CorruptPart, decode_tensor, read_part
from pea.io.keys import pair_hash
from pea.spec import LanguageSpec

Split = Literal["train", "heldout"]
def is_heldout(caption_en: str, caption: str, percent: int) -> bool:
    """The split rule (pea.train.shards applies the same one in SQL)."""
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
    """The held-out sample in memory, from `packed` (a pea.train.shards.Packed: opened, not made again) or else packing
    the shards first if needed; bounded by evaluate.heldout_rows."""
    from pea.train.shards import pack

    if split != "heldout":
        raise ValueError("only the held-out split is loaded whole; training streams its split (pea.train.reader)")
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
