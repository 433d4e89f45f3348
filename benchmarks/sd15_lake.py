"""A lake of random tensors with SD 1.5's shapes, its stores laid out as pea.embed's writers leave them.

    write_lake(lake, pairs=4000, writers=1, teacher_order="key")

pairs.parquet (keys 000000000…, an English and a Chinese caption and an image hash per pair) and three
TensorStores (pea.embed.store, fp16): teacher tokens 77×768, student states 77×1024 (the zh spec's Chinese-CLIP tower),
latents 4×64×64 of a 512-pixel image: ≈ 309 KB a pair (../shared/SCALE.md); with kind="sdxl" SDXL's at 1024 px
(tokens 77×2048 and pooled 1280, latents 4×128×128: ≈ 607 KB). The layout is pea.embed's:
`writers` workers, worker w storing the rows whose hash bucket (pea.embed.bucket: the first 32 bits of the hash
modulo the workers) is w, in key order, in parts of pea.embed.ROWS_PER_PART rows. `teacher_order="shared"` writes the
teacher store instead in a seeded random order of the pairs: what a second language finds when the English
captions it shares were embedded by another language, in that language's order. Values are random (the readers
neither look at nor depend on them); one part is in memory at a time.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

SHAPES = {"teacher": (77, 768), "student": (77, 1024), "latents": (4, 64, 64)}
COLUMNS = {"teacher": "tokens", "student": "states", "latents": "latents"}
# SDXL at 1024 px: both CLIPs' 2048-wide context and the pooled vector in the teacher store, 4×128×128 latents.
SDXL = {"teacher": {"tokens": (77, 2048), "pooled": (1280,)}, "student": {"states": (77, 1024)},
        "latents": {"latents": (4, 128, 128)}}


def _bucket(hash_: str, writers: int) -> int:
    return int(hash_[:8], 16) % writers  # pea.embed.bucket, in Python


def stores(lake: Path) -> dict[str, Path]:
    """Each store's root (one per kind under `lake`)."""
    return {name: next((lake / name).iterdir()) for name in SHAPES}


def write_lake(lake: Path, pairs: int, writers: int = 1, teacher_order: str = "key", kind: str = "sd15",
               latent_size: int | None = None) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pea.embed import ROWS_PER_PART
    from pea.embed.store import TensorStore
    from pea.io.keys import key_digest, text_hash

    stamp = f"{pairs} {writers} {teacher_order} {kind} {latent_size}"
    shapes = SDXL if kind == "sdxl" else {name: {COLUMNS[name]: shape} for name, shape in SHAPES.items()}
    if latent_size is not None:  # smaller images (a smoke test's tiny UNet)
        shapes = {**shapes, "latents": {"latents": (4, latent_size, latent_size)}}
    if (lake / "done").is_file() and (lake / "done").read_text() == stamp:
        return
    shutil.rmtree(lake, ignore_errors=True)
    (lake / "pairs").mkdir(parents=True)
    keys = [f"{i:09d}" for i in range(pairs)]
    en = [f"an english caption number {i}" for i in range(pairs)]
    zh = [f"第{i}个中文说明" for i in range(pairs)]
    images = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(pairs)]
    pq.write_table(pa.table({"key": keys, "image_sha256": images, "caption_en": en, "caption": zh,
                             "native": [False] * pairs}), lake / "pairs" / "pairs.parquet", row_group_size=100_000)
    hashes = {"teacher": [text_hash(c) for c in en], "student": [text_hash(c) for c in zh], "latents": images}
    rng = np.random.default_rng(0)
    for name, columns in shapes.items():
        store = TensorStore(lake / name / key_digest({"bench": name, "kind": kind}), {"bench": name, "kind": kind},
                            "float16")
        order = list(range(pairs))
        if name == "teacher" and teacher_order == "shared":
            order = rng.permutation(pairs).tolist()
        for worker in range(writers):
            mine = [i for i in order if _bucket(hashes[name][i], writers) == worker]
            for start in range(0, len(mine), ROWS_PER_PART):
                rows = mine[start:start + ROWS_PER_PART]
                store.write([hashes[name][i] for i in rows], {column: torch.from_numpy(
                    rng.standard_normal((len(rows), *shape), dtype=np.float32)) for column, shape in columns.items()})
        if name != "latents":  # embed always stores the empty caption (caption dropout, guidance)
            store.write([text_hash("")], {column: torch.zeros(1, *shape) for column, shape in columns.items()})
    (lake / "done").write_text(stamp)


def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM, per address space). Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a child started by a large parent reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
