"""Filter throughput: pea.corpus.filter over a generated raw table in img2dataset's layout.

    .venv/bin/python benchmarks/filter_throughput.py --rows 1000000

Generates `--rows` raw rows (zh; ~70% good, the rest spread over every rule; 20% of target captions native and
traditional, a few mojibake English captions), runs filter_pairs with the full rule set (cleaning, language id,
thresholds, a custom WHERE, both duplicate rules) and prints rows/s. The pandas comparison of the issue is not
written yet.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pea.corpus.filter import filter_pairs
from pea.spec import load_spec

ZH = ["红色的", "圆形", "左边", "有", "两个", "蓝色的", "正方形", "上面", "一只", "猫", "坐在", "桌子", "旁边", "漂亮的", "花园"]
TRAD = ["紅色的", "圓形", "兩個", "藍色的", "貓", "漂亮的", "花園"]
EN = ["a", "red", "circle", "on", "the", "left", "two", "blue", "squares", "cat", "sits", "table", "garden", "café"]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    data = {k: [] for k in ("caption", "caption_zh", "native", "similarity", "punsafe", "pwatermark", "key", "status",
                            "error_message", "width", "height", "original_width", "original_height", "sha256")}
    for i in range(rows):
        native = rng.random() < 0.2
        zh = "".join(rng.choices(TRAD if native else ZH, k=rng.randint(3, 8)))
        en = " ".join(rng.choices(EN, k=rng.randint(3, 12)))
        if rng.random() < 0.01:
            en = en.replace("é", "\u00c3\u00a9")
        ok = rng.random() > 0.1
        w, h = rng.choice([(640, 480), (512, 512), (1024, 768), (100, 80), (2000, 500)])
        data["caption"].append(en)
        data["caption_zh"].append(zh if rng.random() > 0.02 else "The quick brown fox jumps")
        data["native"].append(native)
        data["similarity"].append(rng.uniform(0.2, 0.4))
        data["punsafe"].append(rng.random() * 0.6)
        data["pwatermark"].append(rng.random() * 0.7)
        data["key"].append(f"{i:012d}")
        data["status"].append("success" if ok else "failed_to_download")
        data["error_message"].append(None if ok else rng.choice(["http_error: HTTP 404", "timeout: x", "connection: y"]))
        data["width"].append(min(w, h))
        data["height"].append(min(w, h))
        data["original_width"].append(w)
        data["original_height"].append(h)
        data["sha256"].append(f"{rng.randrange(rows * 50):064x}")
    pq.write_table(pa.table(data), path, row_group_size=100_000)
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"count": rows, "successes": rows}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    spec = load_spec("zh")
    spec = spec.model_copy(update={"filter": spec.filter.model_copy(update={
        "min_similarity": 0.25, "where": "original_width <= 4096 AND caption NOT LIKE '%logo%'"})})
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "zh" / "raw"
        raw.mkdir(parents=True)
        generate(raw / "00000.parquet", args.rows)
        start = time.perf_counter()
        result = filter_pairs(spec, Path(tmp))
        seconds = time.perf_counter() - start
    print(json.dumps({k: v for k, v in result.dropped.items() if v}))
    print(f"rows={result.rows_in} kept={result.rows_out} seconds={seconds:.2f}")
    print(f"pea_filter_rows_per_s={result.rows_in / seconds:.0f}")


if __name__ == "__main__":
    main()
