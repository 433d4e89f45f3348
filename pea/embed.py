"""Precompute everything frozen once: teacher English conditioning, student hidden states, VAE latents.

    embed(spec, lake, pairs_path) -> EmbedResult

Each goes to a content-addressed `TensorStore` keyed by the model (id, revision or content digest)
and its settings, addressed by the normalized caption's or the image's hash:
    lake/embeddings/teacher/<key>/   lake/embeddings/student/<key>/   lake/latents/<key>/
Only missing rows are computed, so a second language sharing English captions, or a rerun, computes
nothing twice; a model is only loaded when something is missing, and freed right after its pass (as
diffusers' SDXL training example does). The empty caption is always stored on both sides: caption
dropout and guidance need it.

What is missing is computed in DuckDB, never in Python: the distinct caption hashes (or image hashes)
of the pairs table, anti-joined with the `hash` column of the store's Parquet parts; images are joined
to their raw shards in the same query. Memory is bounded independently of the corpus size:
- Python holds one batch of inputs (embed.batch_size captions or image blobs, streamed from DuckDB
  as Arrow record batches), that batch's encoder output, and at most one part of encoded rows waiting
  to be written (ROWS_PER_PART rows in the store's 16-bit dtype: 121 MB for SD 1.5 conditioning,
  1,024 × 77 × 768 × 2 B; 1,024 × 4 × 64 × 64 × 2 B = 34 MB of latents at 512 px), plus the models;
- DuckDB holds the distinct input hashes and the stores' hash index (about 100 B a row) within
  DUCKDB_MEMORY_LIMIT, spilling to `<lake>/.duckdb-*.tmp/` beyond it (removed at the end).
"""

from __future__ import annotations

import io
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pea import models
from pea.spec import LanguageSpec
from pea.store import FORMAT as STORE_FORMAT
from pea.store import TensorStore, connect, key_digest

@dataclass(frozen=True)
class EmbedResult:
    teacher_store: Path
    student_store: Path
    latent_store: Path
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def store_keys(spec: LanguageSpec) -> dict[str, dict]:
    """What each store's tensors depend on: the model, its settings and the store's on-disk format."""
    teacher = {**models.model_key(spec.teacher), "format": STORE_FORMAT}
    return {
        "teacher": {"role": "teacher-conditioning", "kind": spec.teacher.kind, **teacher},
        "student": {"role": "student-states", "max_length": spec.student.max_length, "format": STORE_FORMAT,
                    **models.model_key(spec.student)},
        "latents": {"role": "pixels" if spec.teacher.pixel_space else "vae-latents",
                    "image_size": spec.corpus.image_size, "resize": "center_crop", **teacher},
    }


def open_stores(spec: LanguageSpec, lake: Path) -> dict[str, TensorStore]:
    keys = store_keys(spec)
    folders = {"teacher": lake / "embeddings" / "teacher", "student": lake / "embeddings" / "student",
               "latents": lake / "latents"}
    return {name: TensorStore(folders[name] / key_digest(keys[name]), keys[name], spec.embed.dtype) for name in keys}


ROWS_PER_PART = 1024  # a killed run loses at most one part; fewer, larger files read faster
DUCKDB_MEMORY_LIMIT = "1GB"  # DuckDB spills the hash sets and joins to disk beyond this
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _fill(store: TensorStore, batches: Iterator[tuple[list[str], list]], total: int,
          load: Callable[[], Callable[[list], dict[str, torch.Tensor]]], what: str) -> None:
    """Encode the missing (hashes, inputs) batches and store them, one part per ROWS_PER_PART rows.
    The encoder is loaded only when something is missing, and freed afterwards."""
    if not total:
        return
    encode = load()
    dtype = STORE_DTYPES[store.dtype]  # what the store keeps: held in it while a part fills
    hashes: list[str] = []
    tensors: dict[str, list[torch.Tensor]] = {}

    def flush() -> None:
        if hashes:
            store.write(hashes, {name: torch.cat(parts) for name, parts in tensors.items()})
            hashes.clear()
            tensors.clear()

    with tqdm(total=total, desc=f"embed {what}", unit="row") as bar:
        for keys, inputs in batches:
            for name, value in encode(inputs).items():
                tensors.setdefault(name, []).append(value.detach().to("cpu", dtype))
            hashes.extend(keys)
            if len(hashes) >= ROWS_PER_PART:
                flush()
            bar.update(len(keys))
        flush()
    del encode  # reference counting frees the model now; a gc.collect() here cost 0.25 s per call


def _connect(spill: Path) -> duckdb.DuckDBPyConnection:
    return connect(spill, DUCKDB_MEMORY_LIMIT)


def _missing(con: duckdb.DuckDBPyConnection, inputs: str, store: TensorStore) -> tuple[str, int, int]:
    """A query over the temp table `inputs` (hash, ...) for the rows whose hash `store` lacks, how many
    those are, and how many of the inputs are stored already."""
    parts = store.parts()
    if parts:
        query = (f"SELECT i.* FROM {inputs} i ANTI JOIN "
                 f"read_parquet([{', '.join(_literal(p) for p in parts)}]) s ON i.hash = s.hash")
    else:
        query = f"SELECT * FROM {inputs}"
    # fetchall, not fetchone: a result must be complete before the connection runs anything else
    total = con.execute(f"SELECT count(*) FROM {inputs}").fetchall()[0][0]
    missing = con.execute(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
    return query, missing, total - missing


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _batches(con: duckdb.DuckDBPyConnection, query: str, column: str, size: int
             ) -> Iterator[tuple[list[str], list]]:
    """(hashes, inputs) in batches of at most `size` rows, streamed from DuckDB."""
    for batch in con.sql(query).to_arrow_reader(size):
        if batch.num_rows:
            yield batch.column("hash").to_pylist(), batch.column(column).to_pylist()


def embed(spec: LanguageSpec, lake: Path, pairs_path: Path) -> EmbedResult:
    started = time.perf_counter()
    if not Path(pairs_path).is_file():
        raise FileNotFoundError(f"pairs table {pairs_path} does not exist; run the filter stage first")
    if spec.corpus.output_format != "parquet":
        raise ValueError(f"embed reads images from Parquet shards, but corpus.output_format is "
                         f"{spec.corpus.output_format!r}; set corpus.output_format: parquet in the spec")
    stores = open_stores(spec, lake)
    size = spec.embed.batch_size
    spill = Path(lake) / f".duckdb-{uuid.uuid4().hex}.tmp"  # only created if DuckDB spills; removed below
    con = _connect(spill)
    pairs = _literal(str(pairs_path))
    # The distinct inputs of each store, with one representative text or image location per hash.
    for name, column in (("teacher", "caption_en"), ("student", "caption")):
        con.execute(f"""CREATE TEMP TABLE {name}_inputs AS
            SELECT pea_text_hash(text) AS hash, any_value(text) AS text
            FROM (SELECT {column} AS text FROM read_parquet({pairs}) WHERE {column} IS NOT NULL UNION ALL SELECT '')
            GROUP BY hash""")
    con.execute(f"""CREATE TEMP TABLE latents_inputs AS
        SELECT image_sha256 AS hash, min(key) AS key, arg_min(raw_file, key) AS raw_file
        FROM read_parquet({pairs}) GROUP BY image_sha256""")

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
            return {"latents": vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor}
        return encode

    computed, reused = {}, {}
    try:
        for name, load in (("teacher", teacher_encoder), ("student", student_encoder)):
            query, computed[name], reused[name] = _missing(con, f"{name}_inputs", stores[name])
            _fill(stores[name], _batches(con, query, "text", size), computed[name], load, name)
        query, computed["latents"], reused["latents"] = _missing(con, "latents_inputs", stores["latents"])
        if computed["latents"]:
            raw_files = [row[0] for row in con.execute(f"SELECT DISTINCT raw_file FROM ({query})").fetchall()]
            # One pass over the raw shards' key and image columns, joined to the missing images (the smaller
            # side, hashed); img2dataset names the image column after its encode format.
            images = f"""SELECT m.hash, r.{spec.corpus.encode_format} AS data FROM ({query}) m
                JOIN read_parquet([{', '.join(_literal(f) for f in raw_files)}], filename = true) r
                  ON r.key = m.key AND r.filename = m.raw_file"""
            _fill(stores["latents"], _batches(con, images, "data", size), computed["latents"], vae_encoder, "latents")
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root,
                       computed, reused, time.perf_counter() - started)
