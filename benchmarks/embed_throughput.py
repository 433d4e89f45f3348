"""Precompute throughput: the embed stage vs a bare forward of the same encoders on the same inputs.

The stage (pea.embed.embed) reads the pairs and raw shards, hashes, finds what is missing, runs the
teacher text encoder, the student encoder and the VAE encoder in batches, and writes Parquet tensor
stores. The bare forward runs the same three encoders on the same distinct inputs and keeps nothing.
Measured in one run on the tiny embedded-default models (best of --repeats alternating runs each;
both include loading the models). With these tiny encoders the forward pass of 2,000 rows lasts about
a second, so a run of that size swings +-15 % with the machine's load: the default is 8,000 rows.

    python benchmarks/embed_throughput.py [--rows 8000] [--repeats 3] [--threads 1]

Last line: ratio_vs_bare_forward=<bare seconds / stage seconds> (1.0 = the stage costs nothing extra).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)

    from pea import models
    from pea.corpus.synthetic import all_scenes, write_pairs
    from pea.embed import embed
    from pea.models.embedded import prepare_zoo
    from pea.spec import load_spec

    work = Path(tempfile.mkdtemp(prefix="pea-bench-"))
    prepare_zoo(work / "zoo", image_size=32)
    spec = load_spec("zh", "embedded", zoo_dir=work / "zoo")
    scenes = (all_scenes() * (args.rows // len(all_scenes()) + 1))[: args.rows]
    pairs = write_pairs(work, spec, scenes)
    table = pq.read_table(pairs).to_pylist()
    raw = {r["key"]: r["png"] for r in pq.read_table(work / "raw-zh.parquet").to_pylist()}
    english = sorted({r["caption_en"] for r in table} | {""})
    target = sorted({r["caption"] for r in table} | {""})
    images = [raw[r["key"]] for r in table]
    size, image_size = spec.embed.text_batch_size, spec.embed.image_batch_size

    def bare() -> None:
        teacher, student = models.load_teacher_text(spec.teacher), models.load_student(spec.student)
        vae = models.load_vae(spec.teacher)
        with torch.no_grad():
            for i in range(0, len(english), size):
                teacher.encode(english[i:i + size])
            for i in range(0, len(target), size):
                student.encode(target[i:i + size])
            for i in range(0, len(images), image_size):
                arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32)
                          for b in images[i:i + image_size]]
                x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
                vae.encode(x).latent_dist.mean

    # Alternate the two and keep each one's best: the first call of either pays imports.
    bare_s = stage_s = float("inf")
    for attempt in range(args.repeats):
        start = time.perf_counter()
        bare()
        bare_s = min(bare_s, time.perf_counter() - start)
        start = time.perf_counter()
        result = embed(spec, work / f"lake-{attempt}", pairs)
        stage_s = min(stage_s, time.perf_counter() - start)
    rerun = embed(spec, work / "lake-0", pairs)
    print(f"{args.rows} rows: {len(english)} distinct English captions, {len(target)} target captions, "
          f"{len(images)} images")
    print(f"bare forward  {bare_s:7.2f} s")
    print(f"embed stage   {stage_s:7.2f} s  computed {result.computed}")
    print(f"embed rerun   {rerun.seconds:7.2f} s  computed {rerun.computed}")
    print(f"ratio_vs_bare_forward={bare_s / stage_s:.3f}")


if __name__ == "__main__":
    main()
