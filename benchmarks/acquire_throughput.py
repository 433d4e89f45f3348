"""Acquire throughput: the acquire stage (img2dataset with pea's fetch) vs a plain concurrent fetch-and-decode.

    nice -n 19 .venv/bin/python benchmarks/acquire_throughput.py --images 4000 --processes 1 --threads 16

Renders `--distinct` synthetic PNGs (pea.corpus.synthetic, 2 x `--size` pixels a side) and serves them from
127.0.0.1 in a separate process (pea.corpus.synthetic.serve), under `--images` URLs (each file under several
URLs, told apart by a query string the server ignores). Then, over the same URLs with the same number of
workers (`--processes` x `--threads`):

- pea: `pea.corpus.acquire.acquire` on a manifest of the URLs: the url list, img2dataset (its worker
  processes, pea's hardened fetch, decode, center-crop resize to `--size`, JPEG encode, sha256, Parquet
  shards of `--per-shard` rows, stats files), timed from the call to its return, start-up included;
- plain: a `concurrent.futures.ThreadPoolExecutor` of processes x threads workers, each URL fetched with
  urllib, decoded with PIL and center-crop resized to `--size` (`ImageOps.fit`), nothing kept.

Both first run once over 20 of the URLs (not timed), so the benchmark process has imported img2dataset and
PIL, as a flow worker has after its first run; img2dataset's spawned worker and logger processes still start,
and import it, on every call: that start-up (several seconds) is part of the stage's time and is printed
separately (stage seconds minus img2dataset's own shard durations). Then each runs `--repeat` times,
alternating, in fresh folders; the best run of each counts. Prints images/s for both and, last,
`ratio_vs_plain_fetch=<pea images/s / plain images/s>`. Both must get every image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.update(WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from pea.corpus.acquire import acquire  # noqa: E402
from pea.corpus.synthetic import all_scenes, render  # noqa: E402
from pea.spec import ManifestSpec, load_spec  # noqa: E402

SERVER = """
import sys
from pathlib import Path
from pea.corpus.synthetic import serve
with serve(Path(sys.argv[1])) as url:
    print(url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


def _render(root: Path, distinct: int, size: int) -> list[str]:
    scenes = all_scenes()
    names = []
    for i in range(distinct):
        name = f"images/{i:05d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        render(scenes[i % len(scenes)], 2 * size, seed=i).save(root / name, format="PNG")
        names.append(name)
    return names


def _manifest(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption_en": [f"image {i}" for i in range(len(urls))],
                             "caption_zh": [f"图片{i}" for i in range(len(urls))]}), path)
    return path


def _plain(urls: list[str], workers: int, size: int) -> int:
    def fetch(url: str) -> bool:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read()
        with Image.open(io.BytesIO(data)) as image:
            ImageOps.fit(image.convert("RGB"), (size, size))
        return True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(fetch, urls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--distinct", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="output side; the served PNGs are twice that")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    workers = args.processes * args.threads

    spec = load_spec("zh")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = _render(root / "served", min(args.distinct, args.images), args.size)
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(root / "served")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            base = server.stdout.readline().strip()
            urls = [f"{base}{names[i % len(names)]}?i={i}" for i in range(args.images)]
            manifest = _manifest(root / "manifest.parquet", urls)
            corpus = spec.corpus.model_copy(update={
                "manifests": [ManifestSpec(path=str(manifest))], "synthetic": None, "image_size": args.size,
                "encode_format": "jpg", "encode_quality": 95, "processes": args.processes, "threads": args.threads,
                "rows_per_shard": args.per_shard, "timeout_s": 10, "retries": 0,
                "allow_networks": ["127.0.0.1/32"]})  # the loopback server above
            spec = spec.model_copy(update={"corpus": corpus})

            acquire(spec.model_copy(update={"corpus": corpus.model_copy(update={"manifests": [
                ManifestSpec(path=str(_manifest(root / "warm.parquet", urls[:20])))]})}), root / "lake-warm")
            _plain(urls[:20], workers, args.size)

            pea_best = plain_best = float("inf")
            for run in range(args.repeat):
                start = time.perf_counter()
                result = acquire(spec, root / f"lake-{run}")
                pea_best = min(pea_best, time.perf_counter() - start)
                assert result.successes == args.images, f"acquire got {result.successes} of {args.images} images"
                start = time.perf_counter()
                got = _plain(urls, workers, args.size)
                plain_best = min(plain_best, time.perf_counter() - start)
                assert got == args.images
            stats = [json.loads(p.read_text()) for p in sorted((root / "lake-0" / "zh" / "raw").glob("*_stats.json"))]
        finally:
            server.stdin.close()
            server.wait(timeout=30)

    shard_seconds = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    print(f"images={args.images} workers={workers} ({args.processes} process(es) x {args.threads} threads) "
          f"size={args.size} best of {args.repeat}")
    print(f"pea_acquire_seconds={pea_best:.2f} plain_seconds={plain_best:.2f} "
          f"img2dataset_shards_seconds={shard_seconds:.2f} (first shard's start to last shard's end, first run: "
          f"{args.images / shard_seconds:.0f} images/s once started)")
    print(f"pea_acquire_images_per_s={args.images / pea_best:.0f}")
    print(f"plain_fetch_images_per_s={args.images / plain_best:.0f}")
    print(f"ratio_vs_plain_fetch={plain_best / pea_best:.3f}")


if __name__ == "__main__":
    main()
