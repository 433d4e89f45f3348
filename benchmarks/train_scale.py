"""Training at N and 10·N pairs with SD 1.5's tensor shapes: memory and throughput must not grow with the corpus.

Random stores with SD 1.5's shapes in fp16 (teacher tokens 77×768, student states 77×1024 as the zh spec's
Chinese-CLIP tower gives, latents 4×64×64 of a 512-pixel image: ≈ 309 KB a pair, ../shared/SCALE.md) are written
part by part for N and 10·N pairs, packed by pea.shards, then trained by pea.train for a few dozen steps with
the same small UNet (SD 1.5's context width and latent size, few channels), each in a fresh process with one
torch thread. 10·N is chosen so that the in-memory table of the previous design (the whole split in fp32) would
not fit this machine's 24 GB: 40,000 pairs × 618 KB = 24.7 GB.

    python benchmarks/train_scale.py [--pairs 4000] [--steps 40] [--batch 8] [--work /path/with/30GB] [--drop-caches]

Printed last: pack_rss_ratio_10x= (the pack's peak RSS at 10·N ÷ at N), reader_samples_per_s= (the reader alone, one process, prefetch on), reader_vs_node_demand=
(÷ 8 × the 93 samples/s per H100 of docs/performance.md), then rss_ratio_10x= (peak RSS of training at
10·N ÷ at N; aim ≤ 1.10) and throughput_ratio_10x= (samples/s at 10·N ÷ at N; aim ≥ 0.95).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error",
                  OMP_NUM_THREADS="1", TQDM_DISABLE="1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"teacher": (77, 768), "student": (77, 1024), "latents": (4, 64, 64)}
H100_SD15_SAMPLES_PER_S = 93.0  # docs/performance.md, "The distillation step on a GPU", bf16 batch 32


def _unet_dir(root: Path) -> Path:
    """A small SD 1.5-shaped teacher: 4×64×64 latents, 768-wide context, few channels; scheduler as SD 1.5's."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if (root / "unet" / "config.json").is_file():
        return root
    import torch

    torch.manual_seed(0)
    # Attention only at the 16×16 level: cheap enough on a CPU that the reader's share of a step is visible.
    UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32, 64),
                         down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=768,
                         attention_head_dim=8, norm_num_groups=16).save_pretrained(root / "unet")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def write_lake(lake: Path, pairs: int, chunk: int = 1024) -> None:
    """pairs.parquet and three stores of random SD 1.5-shaped tensors, one chunk in memory at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pea.embed import EmbedResult  # noqa: F401 (the same module the real stores come from)
    from pea.store import TensorStore, key_digest, text_hash

    if (lake / "done").is_file():
        return
    shutil.rmtree(lake, ignore_errors=True)
    (lake / "pairs").mkdir(parents=True)
    stores = {name: TensorStore(lake / name / key_digest({"bench": name}), {"bench": name}, "float16")
              for name in SHAPES}
    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, pairs, chunk):
        n = min(chunk, pairs - start)
        en = [f"an english caption number {i}" for i in range(start, start + n)]
        zh = [f"第{i}个中文说明" for i in range(start, start + n)]
        images = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(start, start + n)]
        rows = pa.table({"key": [f"{i:09d}" for i in range(start, start + n)], "image_sha256": images,
                         "caption_en": en, "caption": zh, "native": [False] * n})
        writer = writer or pq.ParquetWriter(lake / "pairs" / "pairs.parquet", rows.schema)
        writer.write_table(rows)
        for name, hashes in (("teacher", [text_hash(c) for c in en]), ("student", [text_hash(c) for c in zh]),
                             ("latents", images)):
            values = torch.from_numpy(rng.standard_normal((n, *SHAPES[name]), dtype=np.float32))
            stores[name].write(hashes, {{"teacher": "tokens", "student": "states", "latents": "latents"}[name]: values})
    writer.close()
    for name, column in (("teacher", "tokens"), ("student", "states")):
        stores[name].write([text_hash("")], {column: torch.zeros(1, *SHAPES[name])})
    (lake / "done").write_text("ok")


def _spec(lake: Path, args):
    from pea.spec import LanguageSpec, load_spec

    spec = load_spec("zh", "embedded", zoo_dir=lake)
    raw = spec.model_dump()
    raw["teacher"] = {"id": str(_unet_dir(Path(args.work) / "teacher")), "revision": None, "kind": "sd15"}
    raw["corpus"]["image_size"] = 512
    raw["train"].update(steps=args.warmup + args.steps, micro_batch_size=args.batch, checkpoint_every=10**6,
                        warmup_steps=1, data={"row_group_rows": 256, "partitions": 1, "shuffle_row_groups": 4,
                                              "prefetch": 1})
    return LanguageSpec.model_validate(raw)


def child(args) -> None:
    """In a fresh process, one stage: `pack`, or `train` (the reader alone, then training); JSON on the last line."""
    import torch

    from pea.embed import EmbedResult
    from pea.reader import ShardStream
    from pea.shards import pack
    from pea.train import train

    torch.set_num_threads(1)
    lake = Path(args.lake)
    spec = _spec(lake, args)
    embedded = EmbedResult(*(next((lake / name).iterdir()) for name in ("teacher", "student", "latents")))
    pairs = lake / "pairs" / "pairs.parquet"
    started = time.perf_counter()
    packed = pack(spec, pairs, embedded)
    out = {"pack_s": time.perf_counter() - started, "train_rows": packed.train.rows}
    if args.child == "train":
        with ShardStream(packed.train, args.batch, seed=1, partitions=1, shuffle_row_groups=4, prefetch=1) as stream:
            stream.batch(0)
            started, n = time.perf_counter(), 0
            for step in range(1, args.reader_batches + 1):
                n += len(stream.batch(step))
            out["reader_samples_per_s"] = n / (time.perf_counter() - started)
        result = train(spec, pairs, embedded, lake / "run")
        timed = [json.loads(line) for line in result.history_path.read_text().splitlines()][args.warmup:]
        # the timed steps only, their reads included
        out["train_samples_per_s"] = len(timed) * args.batch / sum(h["step_s"] for h in timed)
        shutil.rmtree(lake / "run")
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4000, help="N; the second run has 10·N")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reader-batches", type=int, default=200)
    parser.add_argument("--work", default=str(ROOT / "data" / "lake" / "bench-train-scale"))
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each stage (root)")
    parser.add_argument("--child", choices=["pack", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {}
    for n in (args.pairs, 10 * args.pairs):
        lake = Path(args.work) / f"pairs-{n}"
        started = time.perf_counter()
        write_lake(lake, n)
        print(f"{n} pairs: stores written in {time.perf_counter() - started:.0f} s "
              f"({sum(f.stat().st_size for f in lake.rglob('*.parquet')) / 1e9:.1f} GB with the pairs)", flush=True)
        results[n] = {}
        for stage in ("pack", "train"):  # separate processes: each peak RSS is its own stage's
            if args.drop_caches:  # read the shards from disk, not from the page cache the pack just filled
                subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=True)
            out = subprocess.run([sys.executable, __file__, "--child", stage, "--lake", str(lake), "--work", args.work,
                                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                                  "--reader-batches", str(args.reader_batches)],
                                 capture_output=True, text=True, env={**os.environ, "PEA_LAKE": str(lake)})
            if out.returncode:
                sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
            results[n][stage] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n} pairs, {stage}: {json.dumps(results[n][stage])}", flush=True)
    small, large = results[args.pairs]["train"], results[10 * args.pairs]["train"]
    print(f"pack_rss_ratio_10x={results[10 * args.pairs]['pack']['peak_rss_gb'] / results[args.pairs]['pack']['peak_rss_gb']:.3f}")
    print(f"reader_samples_per_s={large['reader_samples_per_s']:.0f}")
    print(f"reader_vs_node_demand={large['reader_samples_per_s'] / (8 * H100_SD15_SAMPLES_PER_S):.2f}")
    print(f"rss_ratio_10x={large['peak_rss_gb'] / small['peak_rss_gb']:.3f}")
    print(f"throughput_ratio_10x={large['train_samples_per_s'] / small['train_samples_per_s']:.3f}")


if __name__ == "__main__":
    main()
