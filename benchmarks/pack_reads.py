"""Bytes the pack reads from the stores per byte it packs, for stores laid out as 1 and 8 embed workers leave them
and for a teacher store shared with a second language (issue #33).

    python benchmarks/pack_reads.py [--pairs 4000] [--work DIR] [--cases one,eight,shared,embed8] [--aim 1.2]

Cases (benchmarks/sd15_lake.py writes the first three: random fp16 tensors with SD 1.5's shapes, ≈ 309 KB a pair):
- `one`: one embed worker: every store in key order, parts of 1,024 rows;
- `eight`: eight workers: each store is eight runs of parts, worker w's hash bucket in key order (a chunk of 1,024
  consecutive pairs then needs about 8 parts of each store);
- `shared`: the teacher store written in another language's order (a seeded random order of the same English
  captions), student and latents by one worker;
- `embed8`: the real pea.embed, eight workers (`embed(worker=w, workers=8)` one after another) with the embedded
  profile's tiny zoo over --embed-pairs synthetic pairs: the layout made by the stage itself. The synthetic world
  repeats its captions (packed rows share stored ones), so this case checks that each part is read exactly once
  instead of giving a ratio.

Each case packs in a fresh process (pea.train.shards.pack). The pack counts, per store, the bytes its process read while
locating and gathering that store (the OS's count, /proc/<pid>/io rchar: hash columns, Parquet footers, tensor
columns, page-cache hits included) and the tensor bytes of the rows it packed; the ratio of the sums is
`pack_read_amplification`. Also printed: parts read against parts in the store, the staging bytes (the gather's one
extra write and read of the packed tensors, pea.train.gather), the whole process's read bytes per packed byte (pairs,
staging and imports included), seconds and peak RSS. Last line: pack_read_amplification=<worst case>; the exit
status is 1 when a case is above --aim.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error",
                  OMP_NUM_THREADS="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LAYOUTS = {"one": (1, "key"), "eight": (8, "key"), "shared": (1, "shared")}


def _embed8(lake: Path, pairs: int, zoo: Path) -> None:
    """pea.embed's own eight-worker layout over the tiny zoo's synthetic pairs."""
    from pea.corpus.synthetic import all_scenes, write_pairs
    from pea.embed import embed
    from pea.models.embedded import prepare_zoo
    from pea.spec import load_spec

    if (lake / "done").is_file():
        return
    shutil.rmtree(lake, ignore_errors=True)
    prepare_zoo(zoo, image_size=32)
    spec = load_spec("zh", "embedded", zoo_dir=zoo)
    scenes = (all_scenes() * (pairs // len(all_scenes()) + 1))[:pairs]
    path = write_pairs(lake, spec, scenes)
    for worker in range(8):
        embed(spec, lake, path, worker=worker, workers=8)
    (lake / "done").write_text(str(path))


def child(args) -> None:
    from sd15_lake import peak_rss_gb, stores

    from pea.embed import EmbedResult, open_stores
    from pea.spec import load_spec
    from pea.train.gather import read_chars
    from pea.train.shards import pack

    lake = Path(args.lake)
    spec = load_spec("zh", "embedded", zoo_dir=Path(args.zoo))
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"data": spec.train.data.model_copy(
        update={"row_group_rows": 256})})})
    if args.case == "embed8":
        pairs = Path((lake / "done").read_text())
        roots = open_stores(spec, lake)
        embedded = EmbedResult(roots["teacher"].root, roots["student"].root, roots["latents"].root)
    else:
        pairs = lake / "pairs" / "pairs.parquet"
        embedded = EmbedResult(*stores(lake).values())
    shutil.rmtree(pairs.parent / "shards", ignore_errors=True)
    before, started, gather = read_chars(), time.perf_counter(), {}
    packed = pack(spec, pairs, embedded, gather)
    seconds, total = time.perf_counter() - started, read_chars() - before
    from pea.embed.store import TensorStore

    parts = {name: len(TensorStore.open(root).parts()) for name, root in
             zip(("teacher", "student", "latents"), (embedded.teacher_store, embedded.student_store,
                                                      embedded.latent_store))}
    shutil.rmtree(packed.root)
    print(json.dumps({"gather": gather, "parts": parts, "process_read_bytes": total, "seconds": seconds,
                      "peak_rss_gb": peak_rss_gb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--cases", default="one,eight,shared,embed8")
    parser.add_argument("--work", default=str(ROOT / "data" / "lake" / "bench-pack-reads"))
    parser.add_argument("--aim", type=float, default=1.2)
    parser.add_argument("--embed-pairs", type=int, default=9000,
                        help="pairs of the embed8 case (8 full parts of 1,024 rows need 8,192)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    parser.add_argument("--zoo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from sd15_lake import write_lake

    work = Path(args.work)
    zoo = work / "zoo"
    worst = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        lake = work / case
        started = time.perf_counter()
        if case == "embed8":
            _embed8(lake, args.embed_pairs, zoo)
        else:
            write_lake(lake, args.pairs, *LAYOUTS[case])
        print(f"{case}: lake ready in {time.perf_counter() - started:.0f} s", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", "1", "--case", case, "--lake", str(lake),
                              "--zoo", str(zoo if case == "embed8" else tempfile.gettempdir())],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        g = r["gather"]
        read = sum(g["read_bytes"].values())
        per_store = ", ".join(f"{name} {g['read_bytes'][name] / 1e6:,.1f} MB in {g['parts_read'][name]} of "
                              f"{r['parts'][name]} parts" for name in g["read_bytes"])
        print(f"{case}: packed {g['packed_bytes'] / 1e6:,.1f} MB of tensors; read from the stores {read / 1e6:,.1f} MB "
              f"({per_store}); staged {g['packed_bytes'] / 1e6:,.1f} MB once; the process read "
              f"{r['process_read_bytes'] / g['packed_bytes']:.2f}× the packed bytes in all; {r['seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        if case == "embed8":  # the synthetic world repeats captions: packed rows share stored ones, so no ratio
            print(f"embed8_each_part_read_once={g['parts_read'] == r['parts']}", flush=True)
            if g["parts_read"] != r["parts"]:
                sys.exit("embed8: a part was read more than once (or not at all)")
            continue
        worst[case] = read / g["packed_bytes"]
        print(f"pack_read_amplification_{case}={worst[case]:.3f}", flush=True)
    print(f"pack_read_amplification={max(worst.values()):.3f}")
    if max(worst.values()) > args.aim:
        sys.exit(f"aim missed: {', '.join(c for c, v in worst.items() if v > args.aim)} above {args.aim}")


if __name__ == "__main__":
    main()
