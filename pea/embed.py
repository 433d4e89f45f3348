"""Precompute everything frozen once: teacher English conditioning, student hidden states, VAE latents.

    embed(spec, lake, pairs_path) -> EmbedResult

Each goes to a content-addressed `TensorStore` keyed by the model (id, revision or content digest)
and its settings, addressed by the normalized caption's or the image's hash:
    lake/embeddings/teacher/<key>/   lake/embeddings/student/<key>/   lake/latents/<key>/
Only missing rows are computed, so a second language sharing English captions, or a rerun, computes
nothing twice; a model is only loaded when something is missing, and freed right after its pass (as
diffusers' SDXL training example does). Memory is bounded by the hashes and captions of the
pairs table plus one part (ROWS_PER_PART rows) of tensors; images stream from each raw shard once. The empty caption is always stored on both sides: caption dropout and guidance need it.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from pea import models
from pea.spec import LanguageSpec
from pea.store import TensorStore, key_digest, text_hash

@dataclass(frozen=True)
class EmbedResult:
    teacher_store: Path
    student_store: Path
    latent_store: Path
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def store_keys(spec: LanguageSpec) -> dict[str, dict]:
    teacher = models.model_key(spec.teacher)
    return {
        "teacher": {"role": "teacher-conditioning", "kind": spec.teacher.kind, **teacher},
        "student": {"role": "student-states", "max_length": spec.student.max_length, **models.model_key(spec.student)},
        "latents": {"role": "pixels" if spec.teacher.pixel_space else "vae-latents",
                    "image_size": spec.corpus.image_size, "resize": "center_crop", **teacher},
    }


def open_stores(spec: LanguageSpec, lake: Path) -> dict[str, TensorStore]:
    keys = store_keys(spec)
    folders = {"teacher": lake / "embeddings" / "teacher", "student": lake / "embeddings" / "student",
               "latents": lake / "latents"}
    return {name: TensorStore(folders[name] / key_digest(keys[name]), keys[name], spec.embed.dtype) for name in keys}


ROWS_PER_PART = 1024  # a killed run loses at most one part; fewer, larger files read faster


def _fill(store: TensorStore, items: Iterator[tuple[str, object]], total: int,
          load: Callable[[], Callable[[list], dict[str, torch.Tensor]]], batch_size: int, what: str) -> None:
    """Encode the missing (hash, input) items in batches and store them, one part per ROWS_PER_PART.
    The encoder is loaded only when something is missing, and freed afterwards."""
    if not total:
        return
    encode = load()
    hashes: list[str] = []
    tensors: dict[str, list[torch.Tensor]] = {}

    def flush() -> None:
        if hashes:
            store.write(hashes, {name: torch.cat(parts) for name, parts in tensors.items()})
            hashes.clear()
            tensors.clear()

    with tqdm(total=total, desc=f"embed {what}", unit="row") as bar:
        while chunk := list(itertools.islice(items, batch_size)):  # itertools.batched is Python 3.12+
            for name, value in encode([payload for _, payload in chunk]).items():
                tensors.setdefault(name, []).append(value)
            hashes.extend(h for h, _ in chunk)
            if len(hashes) >= ROWS_PER_PART:
                flush()
            bar.update(len(chunk))
        flush()
    del encode  # reference counting frees the model now; a gc.collect() here cost 0.25 s per call


def _images(raw_files: dict[str, str], wanted: dict[str, str], column: str, batch_size: int
            ) -> Iterator[tuple[str, bytes]]:
    """(image hash, bytes) for the wanted keys, streaming each raw shard once in record batches
    (img2dataset names the bytes column after its encode format)."""
    for raw_file in sorted(set(raw_files.values())):
        for batch in pq.ParquetFile(raw_file).iter_batches(batch_size=batch_size, columns=["key", column]):
            for key, data in zip(batch.column("key").to_pylist(), batch.column(column).to_pylist()):
                if key in wanted:
                    yield wanted.pop(key), data


def embed(spec: LanguageSpec, lake: Path, pairs_path: Path) -> EmbedResult:
    started = time.perf_counter()
    if not Path(pairs_path).is_file():
        raise FileNotFoundError(f"pairs table {pairs_path} does not exist; run the filter stage first")
    if spec.corpus.output_format != "parquet":
        raise ValueError(f"embed reads images from Parquet shards, but corpus.output_format is "
                         f"{spec.corpus.output_format!r}; set corpus.output_format: parquet in the spec")
    pairs = duckdb.connect().execute(
        "SELECT key, image_sha256, caption_en, caption, raw_file FROM read_parquet($p)", {"p": str(pairs_path)}
    ).fetchall()
    stores = open_stores(spec, lake)
    english = {text_hash(c): c for c in ["", *(row[2] for row in pairs)]}
    target = {text_hash(c): c for c in ["", *(row[3] for row in pairs)]}
    images = {row[1]: row[0] for row in pairs}  # image hash -> a key that holds those bytes
    raw_files = {row[0]: row[4] for row in pairs}
    size = spec.embed.batch_size

    def teacher_encoder():
        return models.load_teacher_text(spec.teacher).encode

    def student_encoder():
        student = models.load_student(spec.student)
        return lambda captions: {"states": student.encode(captions)}

    def vae_encoder():
        vae = None if spec.teacher.pixel_space else models.load_vae(spec.teacher)

        @torch.no_grad()
        def encode(blobs: list[bytes]) -> dict[str, torch.Tensor]:
            pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in blobs]
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1.0
            if vae is None:  # a pixel-space teacher denoises the image itself
                return {"latents": x}
            # The distribution's mean, not a sample: deterministic and reusable by every run.
            return {"latents": vae.encode(x).latent_dist.mean * vae.config.scaling_factor}
        return encode

    computed, reused = {}, {}
    for name, inputs, load in (("teacher", english, teacher_encoder), ("student", target, student_encoder)):
        stored = stores[name].hashes()
        missing = [h for h in inputs if h not in stored]
        _fill(stores[name], ((h, inputs[h]) for h in missing), len(missing), load, size, name)
        computed[name], reused[name] = len(missing), len(inputs) - len(missing)
    stored = stores["latents"].hashes()
    wanted = {key: h for h, key in images.items() if h not in stored}
    computed["latents"], reused["latents"] = len(wanted), len(images) - len(wanted)
    _fill(stores["latents"], _images({k: raw_files[k] for k in wanted}, dict(wanted), spec.corpus.encode_format, size),
          len(wanted), vae_encoder, size, "latents")
    return EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root,
                       computed, reused, time.perf_counter() - started)
