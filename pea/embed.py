"""Precompute everything frozen once: teacher English conditioning, student hidden states, VAE latents.

    embed(spec, lake, pairs_path) -> EmbedResult

Each goes to a content-addressed `TensorStore` keyed by the model (id, revision or content digest)
and its settings, addressed by the normalized caption's or the image's hash:
    lake/embeddings/teacher/<key>/   lake/embeddings/student/<key>/   lake/latents/<key>/
Only missing rows are computed, so a second language sharing English captions, or a rerun, computes
nothing twice; a model is only loaded when something is missing, and freed right after its pass (as
diffusers' SDXL training example does). Memory is bounded by one batch of inputs plus the set of
hashes. The empty caption is always stored on both sides: caption dropout and guidance need it.
"""

from __future__ import annotations

import gc
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
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
        "latents": {"role": "vae-latents", "image_size": spec.corpus.image_size, "resize": "center_crop", **teacher},
    }


def open_stores(spec: LanguageSpec, lake: Path) -> dict[str, TensorStore]:
    keys = store_keys(spec)
    folders = {"teacher": lake / "embeddings" / "teacher", "student": lake / "embeddings" / "student",
               "latents": lake / "latents"}
    return {name: TensorStore(folders[name] / key_digest(keys[name]), keys[name], spec.embed.dtype) for name in keys}


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _fill(store: TensorStore, inputs: dict[str, object],
          load: Callable[[], Callable[[list], dict[str, torch.Tensor]]],
          batch_size: int, what: str) -> tuple[int, int]:
    """Compute and store the inputs whose hash is missing; returns (computed, reused)."""
    stored = store.hashes()
    missing = [h for h in inputs if h not in stored]
    if missing:
        encode = load()
        with tqdm(total=len(missing), desc=f"embed {what}", unit="row") as bar:
            for chunk in _batches(missing, batch_size):
                store.write(chunk, encode([inputs[h] for h in chunk]))
                bar.update(len(chunk))
        del encode
        gc.collect()
    return len(missing), len(inputs) - len(missing)


def _image_reader(pairs: list[tuple[str, str, str]], column: str) -> Callable[[list[str]], list[bytes]]:
    """Read image bytes by key from the raw shards that hold them (img2dataset names the bytes column
    after its encode format)."""
    def read(keys: list[str]) -> list[bytes]:
        wanted = set(keys)
        files = sorted({raw for key, _, raw in pairs if key in wanted})
        rows = duckdb.connect().execute(
            f'SELECT key, "{column}" FROM read_parquet($files) WHERE key IN (SELECT unnest($keys))',
            {"files": files, "keys": keys}).fetchall()
        found = dict(rows)
        return [found[k] for k in keys]
    return read


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
    size = spec.embed.batch_size

    def teacher_encoder():
        return models.load_teacher_text(spec.teacher).encode

    def student_encoder():
        student = models.load_student(spec.student)
        return lambda captions: {"states": student.encode(captions)}

    def vae_encoder():
        vae = models.load_vae(spec.teacher)
        read = _image_reader([(row[0], row[1], row[4]) for row in pairs], spec.corpus.encode_format)

        @torch.no_grad()
        def encode(keys: list[str]) -> dict[str, torch.Tensor]:
            pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in read(keys)]
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1.0
            # The distribution's mean, not a sample: deterministic and reusable by every run.
            return {"latents": vae.encode(x).latent_dist.mean * vae.config.scaling_factor}
        return encode

    computed, reused = {}, {}
    computed["teacher"], reused["teacher"] = _fill(stores["teacher"], english, teacher_encoder, size, "teacher")
    computed["student"], reused["student"] = _fill(stores["student"], target, student_encoder, size, "student")
    computed["latents"], reused["latents"] = _fill(stores["latents"], images, vae_encoder, size, "latents")
    return EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root,
                       computed, reused, time.perf_counter() - started)
