"""Manifest -> url list at 1M and 10M rows under a 256MB DuckDB limit: is memory flat in the corpus size?

Generates two LAION-like Parquet manifests with DuckDB's range() (URL, English and target captions,
similarity, punsafe, pwatermark, width, height; about 1 in 50 URLs not http(s)), then runs
pea.corpus.manifest.prepare_url_list on each in its own child process (so each peak RSS is that size's
alone) with corpus.duckdb.memory_limit 256MB and the default rows_per_shard (parts of 1M rows). A second
run over the 10M manifest checks that an unchanged list is recognised by its digest and left untouched.

    python benchmarks/manifest_scale.py [--rows 1000000 10000000] [--memory-limit 256MB] [--threads 2]

Prints per size: rows, seconds, peak RSS; last: rss_ratio_10x=<peak RSS at the largest ÷ at the smallest>
and rows_per_s=<each size's rows per second>.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _generate(path: Path, rows: int) -> None:
    import duckdb

    duckdb.sql(f"""COPY (SELECT
            CASE WHEN i % 50 = 7 THEN 'ftp://' ELSE 'https://' END || 'img' || (i % 997) || '.example.com/photos/'
                || md5(i::VARCHAR) || '/' || i || '.jpg' AS url,
            'a photograph of item ' || i || ' standing on a ' || ['wooden', 'glass', 'stone'][1 + i % 3]
                || ' table, ' || repeat('detail ', (i % 7)::INTEGER) AS caption_en,
            '一张关于物品' || i || '的照片，放在桌子上' AS caption_zh,
            (i % 1000) / 1000 AS similarity, (i % 97) / 97 AS punsafe, (i % 89) / 89 AS pwatermark,
            256 + i % 1024 AS width, 256 + i % 768 AS height
        FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 122880)""")


def _child(manifest: Path, out: Path, memory_limit: str, threads: int | None) -> None:
    from pea.corpus.manifest import prepare_url_list
    from pea.spec import DuckDBSpec, ManifestSpec, load_spec

    base = load_spec("zh")
    corpus = base.corpus.model_copy(update={"duckdb": DuckDBSpec(memory_limit=memory_limit, threads=threads)})
    spec = base.model_copy(update={"corpus": corpus})
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        urls = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
        runs.append({"seconds": time.perf_counter() - start, "replaced": urls.replaced})
    print(json.dumps({"rows_in": urls.rows_in, "rows": urls.rows, "parts": len(urls.parts), "runs": runs,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--memory-limit", default="256MB")
    parser.add_argument("--threads", type=int, default=None, help="DuckDB's threads (default: every core)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]), args.memory_limit, args.threads)
        return

    work = Path(tempfile.mkdtemp(prefix="pea-bench-manifest-"))
    results = {}
    try:
        for rows in args.rows:
            manifest = work / f"manifest-{rows}.parquet"
            start = time.perf_counter()
            _generate(manifest, rows)
            print(f"generated {rows} rows ({manifest.stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            command = [sys.executable, __file__, "--child", str(manifest), str(work / f"lake-{rows}" / "manifest-urls"),
                       "--memory-limit", args.memory_limit]
            if args.threads:
                command += ["--threads", str(args.threads)]
            child = subprocess.run(command, check=True, capture_output=True, text=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            first, second = result["runs"]
            results[rows] = result
            print(f"rows={rows} kept={result['rows']} parts={result['parts']} seconds={first['seconds']:.1f} "
                  f"rerun_seconds={second['seconds']:.1f} rerun_replaced={second['replaced']} "
                  f"peak_rss_mb={result['peak_rss_mb']:.0f}", flush=True)
            manifest.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = min(results), max(results)
    print(f"rss_ratio_10x={results[large]['peak_rss_mb'] / results[small]['peak_rss_mb']:.3f}")
    print("rows_per_s=" + " ".join(f"{rows}:{rows / results[rows]['runs'][0]['seconds']:.0f}" for rows in results))


if __name__ == "__main__":
    main()
