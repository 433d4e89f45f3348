"""Precompute everything frozen once: teacher English conditioning, student hidden states, VAE latents.

    embed(spec, lake, pairs_path, worker=0, workers=1) -> EmbedResult   # one worker's slice
    launch(spec, lake, pairs_path) -> EmbedResult    # what the flow's embed task calls: embed.launcher's workers

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
- Python holds one batch of inputs (embed.text_batch_size captions or embed.image_batch_size image
  blobs, streamed from DuckDB
  as Arrow record batches), that batch's encoder output, and at most one part of encoded rows waiting
  to be written (ROWS_PER_PART rows in the store's 16-bit dtype: 121 MB for SD 1.5 conditioning,
  1,024 × 77 × 768 × 2 B; 1,024 × 4 × 64 × 64 × 2 B = 34 MB of latents at 512 px), plus the models;
- DuckDB holds the distinct input hashes and the stores' hash index (about 100 B a row) within
  `corpus.duckdb.memory_limit`, spilling to `<lake>/.duckdb-*.tmp/` beyond it (removed at the end).

Many workers, exactly once: worker i of n takes only the inputs whose bucket, the first 32 bits of the
(hex sha256) hash modulo n, is i, so the slices are disjoint whatever each worker has already written,
and together they leave the stores as one worker does (encoders see fixed-shape rows, so a row's
tensor does not depend on its batch). `launch` hashes every distinct input once (write_inputs: one folder of
Parquet per bucket, DuckDB's partitioned COPY) and runs embed.launcher's layout through the `deepspeed`
launcher (pea.embed.launcher, as training does); each rank reads RANK / WORLD_SIZE and embeds its bucket's inputs:
    deepspeed --num_gpus 8 --module pea.embed --language zh [--profile embedded] [--lake L] [--pairs P]
A killed worker loses at most the part it was filling; a rerun computes only what is still missing.
Images must all be corpus.image_size square (corpus.resize_mode center_crop or border): another size
is refused with an error naming the image, never stacked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from pea import models
from pea.embed import launcher
from pea.embed.store import FORMAT as STORE_FORMAT
from pea.embed.store import TensorStore
from pea.io import progress
from pea.io.atomic import publish
from pea.io.keys import connect, key_digest
from pea.spec import LanguageSpec, lake_root


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

    with progress.bar(total=total, desc=f"embed {what}", unit="row") as bar:
        for keys, inputs in batches:
            for name, value in encode(inputs).items():
                tensors.setdefault(name, []).append(value.detach().to("cpu", dtype))
            hashes.extend(keys)
            if len(hashes) >= ROWS_PER_PART:
                flush()
            bar.update(len(keys))
        flush()
    del encode  # reference counting frees the model now; a gc.collect() here cost 0.25 s per call


def _connect(spec: LanguageSpec, spill: Path) -> duckdb.DuckDBPyConnection:
    """DuckDB bounded by the spec's corpus.duckdb: it spills the hash sets and joins to disk beyond the limit."""
    return connect(spill, spec.corpus.duckdb.memory_limit)


def _missing(con: duckdb.DuckDBPyConnection, inputs: str, store: TensorStore) -> tuple[str, int, int]:
    """A query over the temp table `inputs` (hash, ...) for the rows whose hash `store` lacks, how many
    those are, and how many of the inputs are stored already."""
    parts = store.parts()
    # In the order of the first pair that needs each input: the stores then hold rows in pair order, which keeps
    # pea.train.shards' gather sequential (a part read once, not once per chunk of pairs).
    if parts:
        query = (f"SELECT i.* FROM {inputs} i ANTI JOIN "
                 f"read_parquet([{', '.join(_literal(p) for p in parts)}]) s ON i.hash = s.hash ORDER BY i.key")
    else:
        query = f"SELECT * FROM {inputs} ORDER BY key"
    # fetchall, not fetchone: a result must be complete before the connection runs anything else
    total = con.execute(f"SELECT count(*) FROM {inputs}").fetchall()[0][0]
    missing = con.execute(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
    return query, missing, total - missing


def bucket(column: str, workers: int) -> str:
    """SQL for the worker (0 .. workers-1) that owns a row: the first 32 bits of its hex hash modulo
    `workers`. Stable (a function of the hash alone) and the same in every process and DuckDB version."""
    return f"(('0x' || substr({column}, 1, 8))::UBIGINT % {int(workers)})"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _pixels(image: dict, size: int) -> np.ndarray:
    """An image row (hash, key, raw_file, data) as size x size x 3 floats; any other size is refused, as the
    latents store's key promises that size and a batch can only stack one."""
    pixels = np.asarray(Image.open(io.BytesIO(image["data"])).convert("RGB"), dtype=np.float32)
    if pixels.shape[:2] != (size, size):
        raise ValueError(
            f"image {image['key']!r} of {image['raw_file']} (sha256 {image['hash']}) is {pixels.shape[1]}x"
            f"{pixels.shape[0]} pixels, not corpus.image_size {size}x{size}: embed stacks one size only. Set "
            "corpus.resize_mode to center_crop or border in the spec (keep_ratio and no keep other sizes) and "
            "acquire and filter again")
    return pixels


def _batches(con: duckdb.DuckDBPyConnection, query: str, column: str, size: int
             ) -> Iterator[tuple[list[str], list]]:
    """(hashes, inputs) in batches of at most `size` rows, streamed from DuckDB."""
    for batch in con.sql(query).to_arrow_reader(size):
        if batch.num_rows:
            yield batch.column("hash").to_pylist(), batch.column(column).to_pylist()


def embed(spec: LanguageSpec, lake: Path, pairs_path: Path, worker: int = 0, workers: int = 1,
          inputs: Path | None = None) -> EmbedResult:
    """Compute the missing rows whose hash bucket is `worker` (of `workers`); the defaults: all of them. `inputs`:
    the folder write_inputs made for these pairs and workers (the launcher's), read instead of hashing here."""
    started = time.perf_counter()
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} of {workers} does not exist; workers are numbered 0 to {workers - 1}")
    if not Path(pairs_path).is_file():
        raise FileNotFoundError(f"pairs table {pairs_path} does not exist; run the filter stage first")
    if spec.corpus.output_format != "parquet":
        raise ValueError(f"embed reads images from Parquet shards, but corpus.output_format is "
                         f"{spec.corpus.output_format!r}; set corpus.output_format: parquet in the spec")
    stores = open_stores(spec, lake)
    spill = spec.corpus.duckdb.spill(lake, f".duckdb-{uuid.uuid4().hex}.tmp")  # created only if DuckDB spills
    con = _connect(spec, spill)
    pairs = _literal(str(pairs_path))
    # The distinct inputs of each store in this worker's bucket, with one representative text or image
    # location per hash.
    if inputs is not None:  # the launcher hashed every input once (write_inputs): read this worker's bucket
        _read_inputs(con, Path(inputs), worker)
    else:  # called directly: hash here, keep this worker's bucket
        for name, query in _input_queries(pairs).items():
            where = f"WHERE {bucket('hash', workers)} = {int(worker)}" if workers > 1 else ""
            con.execute(f"CREATE TEMP TABLE {name}_inputs AS SELECT * FROM ({query}) {where}")

    def teacher_encoder():
        return models.load_teacher_text(spec.teacher).encode

    def student_encoder():
        student = models.load_student(spec.student)
        return lambda captions: {"states": student.encode(captions)}

    def vae_encoder():
        vae = None if spec.teacher.pixel_space else models.load_vae(spec.teacher)

        @torch.no_grad()
        def encode(images: list[dict]) -> dict[str, torch.Tensor]:
            pixels = [_pixels(image, spec.corpus.image_size) for image in images]
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1.0
            if vae is None:  # a pixel-space teacher denoises the image itself
                return {"latents": x}
            # The distribution's mean, not a sample: deterministic and reusable by every run.
            return {"latents": vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor}
        return encode

    computed, reused = {}, {}
    try:
        for name, load in (("teacher", teacher_encoder), ("student", student_encoder)):
            with _claim(stores[name], worker, workers):
                query, computed[name], reused[name] = _missing(con, f"{name}_inputs", stores[name])
                _fill(stores[name], _batches(con, query, "text", spec.embed.text_batch_size), computed[name], load,
                      name)
        with _claim(stores["latents"], worker, workers):
            _fill_latents(spec, con, stores["latents"], vae_encoder, computed, reused)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root,
                       computed, reused, time.perf_counter() - started)


def _input_queries(pairs: str) -> dict[str, str]:
    """Per store, its distinct inputs with one representative text (or image location) and key per hash. A caption
    is hashed once however often it repeats (pea_text_hash runs in Python: DuckDB's own NFC and whitespace rules
    differ from text_hash's on NUL and on characters of newer Unicode versions, so SQL does not compute it)."""
    queries = {name: f"""SELECT pea_text_hash(text) AS hash, arg_min(text, key) AS text, min(key) AS key
        FROM (SELECT text, min(key) AS key FROM (SELECT {column} AS text, key FROM read_parquet({pairs})
                                                WHERE {column} IS NOT NULL UNION ALL SELECT '', '') GROUP BY text)
        GROUP BY hash""" for name, column in (("teacher", "caption_en"), ("student", "caption"))}
    queries["latents"] = f"""SELECT image_sha256 AS hash, min(key) AS key, arg_min(raw_file, key) AS raw_file
        FROM read_parquet({pairs}) GROUP BY image_sha256"""
    return queries


def write_inputs(spec: LanguageSpec, pairs_path: Path, out: Path, workers: int) -> None:
    """Hash every input once, for all workers: `out/<store>/bucket=<i>/*.parquet` holds worker i's distinct inputs
    (DuckDB's partitioned COPY, streamed under corpus.duckdb's memory limit). Each worker then reads its own bucket
    and hashes nothing, where each used to hash every row of the pairs to keep 1/workers of them."""
    spill = spec.corpus.duckdb.spill(out, f".duckdb-{uuid.uuid4().hex}.tmp")
    con = _connect(spec, spill)
    try:
        for name, query in _input_queries(_literal(str(pairs_path))).items():
            con.execute(f"COPY (SELECT *, {bucket('hash', workers)} AS bucket FROM ({query})) TO "
                        f"{_literal(str(Path(out) / name))} (FORMAT parquet, PARTITION_BY (bucket))")
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _read_inputs(con: duckdb.DuckDBPyConnection, inputs: Path, worker: int) -> None:
    for name, columns in (("teacher", "hash VARCHAR, text VARCHAR, key VARCHAR"),
                          ("student", "hash VARCHAR, text VARCHAR, key VARCHAR"),
                          ("latents", "hash VARCHAR, key VARCHAR, raw_file VARCHAR")):
        files = sorted((inputs / name / f"bucket={worker}").glob("*.parquet"))
        con.execute(f"CREATE TEMP TABLE {name}_inputs ({columns})")  # empty when no input falls in this bucket
        if files:
            con.execute(f"INSERT INTO {name}_inputs BY NAME SELECT * FROM "
                        f"read_parquet([{', '.join(_literal(str(f)) for f in files)}], hive_partitioning = false)")


def _claim(store: TensorStore, worker: int, workers: int) -> FileLock:
    """Who computes a store's missing rows of one hash bucket: one process at a time. Two languages share the
    English teacher store; without this, both would find the same captions missing and store them twice. Workers
    of one run hold different buckets and never wait for each other. (filelock's flock: local disks and most
    shared filesystems; where locks do not work, duplicates are harmless, as pack keeps one row per hash.)"""
    return FileLock(store.root / f".claim-{worker}-of-{workers}.lock")


def _fill_latents(spec: LanguageSpec, con: duckdb.DuckDBPyConnection, store: TensorStore, vae_encoder: Callable,
                  computed: dict[str, int], reused: dict[str, int]) -> None:
    query, computed["latents"], reused["latents"] = _missing(con, "latents_inputs", store)
    if computed["latents"]:
        raw_files = [row[0] for row in con.execute(f"SELECT DISTINCT raw_file FROM ({query})").fetchall()]
        # One pass over the raw shards' key and image columns, joined to the missing images (the smaller
        # side, hashed); img2dataset names the image column after its encode format.
        images = f"""SELECT m.hash, {{'hash': m.hash, 'key': m.key, 'raw_file': m.raw_file,
                                      'data': r.{spec.corpus.encode_format}}} AS image FROM ({query}) m
            JOIN read_parquet([{', '.join(_literal(f) for f in raw_files)}], filename = true) r
              ON r.key = m.key AND r.filename = m.raw_file"""
        _fill(store, _batches(con, images, "image", spec.embed.image_batch_size), computed["latents"],
              vae_encoder, "latents")


def _total(results: list[EmbedResult], field_name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for result in results:
        for name, count in getattr(result, field_name).items():
            out[name] = out.get(name, 0) + count
    return out


def launch(spec: LanguageSpec, lake: Path, pairs_path: Path) -> EmbedResult:
    """Embed with embed.launcher's workers: in this process for one, under the deepspeed launcher otherwise.
    The result sums every worker's counts (each rank writes its own to a scratch folder in the lake)."""
    layout = spec.embed.launcher
    if layout.world_size == 1:
        return embed(spec, lake, pairs_path)
    started = time.perf_counter()
    lake, pairs_path = Path(lake).resolve(), Path(pairs_path).resolve()
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs table {pairs_path} does not exist; run the filter stage first")
    # In the lake, which every node sees at the same path; owner-only, as it may hold .deepspeed_env.
    work = lake / f".embed-{uuid.uuid4().hex}"
    work.mkdir(mode=0o700, parents=True)
    try:
        (work / "spec.json").write_text(spec.model_dump_json(indent=2))
        write_inputs(spec, pairs_path, work / "inputs", layout.world_size)  # hashed once here, not in every worker
        command = [*launcher.deepspeed_command(layout, "pea.embed", "embed.launcher"), "--spec",
                   str(work / "spec.json"), "--lake", str(lake), "--pairs", str(pairs_path), "--result-dir", str(work),
                   "--inputs", str(work / "inputs")]
        launcher.run(command, layout, work)
        results = [_read_result(p) for p in sorted(work.glob("rank-*.json"))]
        if len(results) != layout.world_size:
            raise launcher.LaunchError(f"{len(results)} of {layout.world_size} embed workers reported a result "
                                       f"in {work}; rerun the stage (it computes only what is still missing)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = results[0]
    return EmbedResult(first.teacher_store, first.student_store, first.latent_store, _total(results, "computed"),
                       _total(results, "reused"), time.perf_counter() - started)


def _write_result(result: EmbedResult, path: Path) -> None:
    fields = {"teacher_store": str(result.teacher_store), "student_store": str(result.student_store),
              "latent_store": str(result.latent_store), "computed": result.computed, "reused": result.reused,
              "seconds": result.seconds}
    with publish(path, "embed: worker result") as tmp:
        tmp.write_text(json.dumps(fields, indent=2))


def _read_result(path: Path) -> EmbedResult:
    fields = json.loads(path.read_text())
    return EmbedResult(Path(fields["teacher_store"]), Path(fields["student_store"]), Path(fields["latent_store"]),
                       fields["computed"], fields["reused"], fields["seconds"])


def main(argv: list[str] | None = None) -> None:
    parser = launcher.rank_parser(__doc__)
    parser.add_argument("--lake", type=Path, help="default $PEA_LAKE or the project's data/lake")
    parser.add_argument("--result-dir", type=Path, help="write this rank's counts to <dir>/rank-<RANK>.json")
    parser.add_argument("--inputs", type=Path, help="the hashed inputs the launcher wrote (write_inputs)")
    args = parser.parse_args(argv)
    spec = launcher.spec_from(args)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        # CPU workers on one machine share the run's threads; torch would give each all of them and thrash.
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        budget = int(os.environ.get("OMP_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, budget // local))
    lake = args.lake or lake_root()
    pairs = args.pairs or lake / spec.language / "pairs" / "pairs.parquet"
    result = embed(spec, lake, pairs, worker=rank, workers=world, inputs=args.inputs)
    if args.result_dir is not None:
        _write_result(result, args.result_dir / f"rank-{rank}.json")
    print(f"embed worker {rank} of {world}: computed {result.computed}, reused {result.reused} "
          f"in {result.seconds:.1f} s")

