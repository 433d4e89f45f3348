"""The training table: pairs ⋈ teacher conditioning ⋈ student states ⋈ latents, split by hash.

A pair is held out when the hash of its caption pair falls in the spec's held-out share, so the split
is deterministic, stable across reruns and languages, and no held-out prompt is ever trained on.
This version materialises one split in memory (rows × (77×768 + L×d + latent) × 2 bytes in fp16);
a streaming, per-rank reader replaces it when tables outgrow one machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import torch

from pea.embed import EmbedResult
from pea.spec import LanguageSpec
from pea.store import TensorStore, text_hash

Split = Literal["train", "heldout"]


def data_fingerprint(pairs_path: Path) -> str:
    """A digest of the pairs' content (image hashes and captions), independent of file layout."""
    digest = hashlib.sha256()
    for row in duckdb.connect().execute(
            "SELECT image_sha256, caption_en, caption FROM read_parquet($p) ORDER BY ALL", {"p": str(pairs_path)}
    ).fetchall():
        digest.update("\x1f".join(row).encode() + b"\x1e")
    return digest.hexdigest()[:16]


def is_heldout(caption_en: str, caption: str, percent: int) -> bool:
    return int(text_hash(caption_en + "\n" + caption)[:8], 16) % 100 < percent


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


def load_table(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, split: Split) -> TrainingTable:
    rows = duckdb.connect().execute(
        "SELECT caption_en, caption, image_sha256, native FROM read_parquet($p) ORDER BY key", {"p": str(pairs_path)}
    ).fetchall()
    rows = [r for r in rows if is_heldout(r[0], r[1], spec.evaluate.heldout_percent) == (split == "heldout")]
    if not rows:
        raise ValueError(f"the {split} split of {pairs_path} is empty; acquire more pairs or change "
                         "evaluate.heldout_percent in the spec")
    teacher, student, latents = (TensorStore.open(root) for root in
                                 (embedded.teacher_store, embedded.student_store, embedded.latent_store))
    en, tgt, img, native = ([r[i] for r in rows] for i in range(4))
    conditioning = teacher.read([text_hash(c) for c in en])
    return TrainingTable(
        captions_en=en, captions=tgt,
        teacher=conditioning["tokens"], teacher_pooled=conditioning.get("pooled"),
        student=student.read([text_hash(c) for c in tgt])["states"],
        latents=latents.read(img)["latents"],
        native=torch.tensor(native, dtype=torch.float32),
        teacher_empty=teacher.read([text_hash("")])["tokens"][0],
        student_empty=student.read([text_hash("")])["states"][0],
    )
