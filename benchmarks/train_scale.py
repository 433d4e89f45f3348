"""Training at N and 10·N pairs with SD 1.5's tensor shapes: memory and throughput must not grow with the corpus,
and the reader's cost, separated from the disk's, must keep up with a node of GPUs.

Random stores with SD 1.5's shapes in fp16 (benchmarks/sd15_lake.py: ≈ 309 KB a pair) for N and 10·N pairs, packed
by pea.train.shards, then, each in a fresh process with one torch thread:
- reader: pea.train.reader.ShardStream alone (one partition, `shuffle_row_groups` row groups a window, prefetch 1). One
  window untimed, then --reader-windows whole windows timed, the pack's files evicted from the page cache before
  each (posix_fadvise DONTNEED: the reads come from the disk, or from whatever cache lies below this machine), with
  the process's CPU seconds (every thread) beside the wall time; then the same files read raw (os.read, 8 MB
  blocks), evicted first, for as many bytes: the disk's own sequential rate in the same run;
- train: pea.train with the shipped default (its warm start, token_warmup × steps of regression with no UNet pass,
  then the distillation steps): each phase gets one warm window and is timed over its whole windows after it
  (distillation: --train-windows; the warm start: token_warmup times as many, less one); samples/s over the timed
  windows' steps (their reads included), peak RSS of the process.
10·N is chosen so that the in-memory table of an earlier design (the split in fp32) would not fit this machine's
24 GB: 40,000 pairs × 618 KB = 24.7 GB.

    python benchmarks/train_scale.py [--pairs 4000] [--work DIR]          # ≈ 45 GB of disk at 40,000 pairs
    python benchmarks/train_scale.py --smoke                               # every path, small: row groups of 16

Printed last:
- pack_rss_ratio_10x= (the pack's peak RSS at 10·N ÷ at N);
- reader_cpu_s_per_sample=, disk_raw_mb_s=, reader_mb_s= (cold, at 10·N): what the reader costs, what the disk gives,
  what the reader got from it here;
- reader_vs_node_demand= min(8 cores ÷ the reader's CPU s per sample, the node's disk rate ÷ bytes per sample) ÷ a
  node's demand (8 × 93.2 samples/s per H100, docs/performance.md): one reader per GPU, each with a core, on a node
  whose disk delivers --node-disk-mb-s (default 2,000 MB/s: an assumption, docs/scale.md § 5 gives its source);
- rss_ratio_10x= (training's peak RSS at 10·N ÷ at N; aim ≤ 1.10), fitting_throughput_ratio_10x= (the warm start's
  samples/s at 10·N ÷ at N), throughput_ratio_10x= (the distillation step's; aim ≥ 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error",
                  OMP_NUM_THREADS="1", TQDM_DISABLE="1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sd15_lake import peak_rss_gb, stores, write_lake  # noqa: E402

H100_SD15_SAMPLES_PER_S = 93.2  # docs/performance.md, "The distillation step on a GPU", bf16 batch 32
GPUS_PER_NODE = 8


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


def _window_steps(args) -> int:
    return args.row_group_rows * args.shuffle_row_groups // args.batch


def _spec(lake: Path, args):
    from pea.spec import LanguageSpec, load_spec

    spec = load_spec("zh", "embedded", zoo_dir=lake)
    raw = spec.model_dump()
    raw["teacher"] = {"id": str(_unet_dir(Path(args.work) / "teacher")), "revision": None, "kind": "sd15"}
    raw["corpus"]["image_size"] = 512
    raw["train"].update(steps=(1 + args.train_windows) * _window_steps(args), micro_batch_size=args.batch,
                        checkpoint_every=10**6, warmup_steps=1,
                        data={"row_group_rows": args.row_group_rows, "partitions": 1,
                              "shuffle_row_groups": args.shuffle_row_groups, "prefetch": 1})
    return LanguageSpec.model_validate(raw)


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from this machine's page cache (no root needed); a cache below the VM stays."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_read(files: list[Path], limit: int) -> tuple[int, float]:
    """Bytes read and seconds: the files in order, sequentially, 8 MB reads, until `limit` bytes."""
    done, started = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < limit and (block := os.read(fd, 8 << 20)):
                done += len(block)
        finally:
            os.close(fd)
        if done >= limit:
            break
    return done, time.perf_counter() - started


def _reader(packed, args) -> dict:
    from pea.train.reader import ShardStream

    files = sorted((packed.root / "train").glob("*.parquet"))
    row_bytes = sum(f.stat().st_size for f in files) / packed.train.rows
    steps = _window_steps(args)
    with ShardStream(packed.train, args.batch, seed=1, partitions=1, shuffle_row_groups=args.shuffle_row_groups,
                     prefetch=1) as stream:
        for step in range(steps):  # the warm window (its read, and the read-ahead of the next, untimed)
            stream.batch(step)
        wall, cpu, samples = 0.0, 0.0, 0
        for window in range(1, 1 + args.reader_windows):
            _evict(files)  # every window from the disk, even where the pack fits the page cache several times over
            started, cpu_started = time.perf_counter(), time.process_time()
            for step in range(window * steps, (window + 1) * steps):
                samples += len(stream.batch(step))
            wall += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
    _evict(files)
    raw_bytes, raw_s = _raw_read(files, int(samples * row_bytes))
    return {"reader_samples_per_s": samples / wall, "reader_mb_s": samples * row_bytes / wall / 1e6,
            "reader_cpu_s_per_sample": cpu / samples, "reader_samples": samples, "row_bytes": row_bytes,
            "disk_raw_mb_s": raw_bytes / raw_s / 1e6, "disk_raw_gb": raw_bytes / 1e9}


def child(args) -> None:
    """In a fresh process, one stage: `pack`, `reader` or `train`; JSON on the last line."""
    import torch

    from pea.embed import EmbedResult
    from pea.train import train
    from pea.train.shards import pack

    torch.set_num_threads(1)
    lake = Path(args.lake)
    spec = _spec(lake, args)
    embedded = EmbedResult(*stores(lake).values())
    pairs = lake / "pairs" / "pairs.parquet"
    if args.child == "pack":  # packed here, not found: the stage's time and memory are what is measured
        shutil.rmtree(lake / "pairs" / "shards", ignore_errors=True)
    started = time.perf_counter()
    packed = pack(spec, pairs, embedded)
    out = {"pack_s": time.perf_counter() - started, "train_rows": packed.train.rows}
    if args.child == "reader":
        out |= _reader(packed, args)
    elif args.child == "train":
        _evict(sorted((packed.root / "train").glob("*.parquet")))
        result = train(spec, pairs, embedded, lake / "run", packed)
        history = [json.loads(line) for line in result.history_path.read_text().splitlines()]
        # Two phases (the default's warm start first, then distillation), each timed over whole windows after a warm
        # one, their reads included: the warm start's steps have no UNet pass, so they ask the reader for rows
        # about ten times as fast.
        window, fitting = _window_steps(args), spec.train.fitting_steps
        for phase, timed in (("fitting", history[window:fitting]), ("train", history[fitting + window:])):
            if timed:
                out[f"{phase}_samples_per_s"] = len(timed) * args.batch / sum(h["step_s"] for h in timed)
                out[f"{phase}_timed_steps"] = len(timed)
        shutil.rmtree(lake / "run")
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4000, help="N; the second run has 10·N")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--row-group-rows", type=int, default=256, help="train.data.row_group_rows (the default)")
    parser.add_argument("--shuffle-row-groups", type=int, default=4, help="train.data.shuffle_row_groups")
    parser.add_argument("--train-windows", type=int, default=4, help="timed training windows, after a warm one")
    parser.add_argument("--reader-windows", type=int, default=10, help="timed reader windows, after a warm one")
    parser.add_argument("--node-disk-mb-s", type=float, default=2000.0, help="a node's disk rate (docs/scale.md § 5)")
    parser.add_argument("--smoke", action="store_true", help="every path at a small size: 300 / 3,000 pairs, row "
                        "groups of 16 (windows of 64 rows)")
    parser.add_argument("--work", default=str(ROOT / "data" / "lake" / "bench-train-scale"))
    parser.add_argument("--child", choices=["pack", "reader", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.row_group_rows = 300, 16
    if args.child:
        return child(args)
    forward = ["--work", args.work, "--batch", str(args.batch), "--row-group-rows", str(args.row_group_rows),
               "--shuffle-row-groups", str(args.shuffle_row_groups), "--train-windows", str(args.train_windows),
               "--reader-windows", str(args.reader_windows)]
    results = {}
    for n in (args.pairs, 10 * args.pairs):
        lake = Path(args.work) / f"pairs-{n}"
        started = time.perf_counter()
        write_lake(lake, n)
        print(f"{n} pairs: stores written in {time.perf_counter() - started:.0f} s "
              f"({sum(f.stat().st_size for f in lake.glob('*/*/*.parquet')) / 1e9:.1f} GB of stores)", flush=True)
        results[n] = {}
        for stage in ("pack", "reader", "train"):  # separate processes: each peak RSS is its own stage's
            out = subprocess.run([sys.executable, __file__, "--child", stage, "--lake", str(lake), *forward],
                                 capture_output=True, text=True, env={**os.environ, "PEA_LAKE": str(lake)})
            if out.returncode:
                sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
            results[n][stage] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n} pairs, {stage}: {json.dumps(results[n][stage])}", flush=True)
    small, large = results[args.pairs], results[10 * args.pairs]
    reader = large["reader"]
    demand = GPUS_PER_NODE * H100_SD15_SAMPLES_PER_S
    cpu_bound = GPUS_PER_NODE / reader["reader_cpu_s_per_sample"]
    disk_bound = args.node_disk_mb_s * 1e6 / reader["row_bytes"]
    print(f"pack_rss_ratio_10x={large['pack']['peak_rss_gb'] / small['pack']['peak_rss_gb']:.3f}")
    print(f"reader_cpu_s_per_sample={reader['reader_cpu_s_per_sample']:.2e} "
          f"(one core: {1 / reader['reader_cpu_s_per_sample']:,.0f} samples/s)")
    print(f"disk_raw_mb_s={reader['disk_raw_mb_s']:.0f} reader_mb_s={reader['reader_mb_s']:.0f} "
          f"reader_samples_per_s={reader['reader_samples_per_s']:.0f} (cold, {reader['reader_samples']} samples)")
    print(f"node: {demand:.0f} samples/s demanded; {cpu_bound:,.0f} from 8 reader cores, {disk_bound:,.0f} from "
          f"{args.node_disk_mb_s:,.0f} MB/s of disk")
    print(f"reader_vs_node_demand={min(cpu_bound, disk_bound) / demand:.2f}")
    print(f"rss_ratio_10x={large['train']['peak_rss_gb'] / small['train']['peak_rss_gb']:.3f}")
    if "fitting_samples_per_s" in large["train"]:
        print(f"fitting_throughput_ratio_10x={large['train']['fitting_samples_per_s'] / small['train']['fitting_samples_per_s']:.3f} "
              f"(the warm start: {large['train']['fitting_timed_steps']} timed steps at 10·N)")
    print(f"throughput_ratio_10x={large['train']['train_samples_per_s'] / small['train']['train_samples_per_s']:.3f} "
          f"(distillation: {large['train']['train_timed_steps']} timed steps at 10·N)")


if __name__ == "__main__":
    main()
