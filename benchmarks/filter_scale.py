"""The filter at N and factor·N raw rows under a fixed DuckDB memory limit: memory must stay flat and throughput
must hold as the corpus grows.

    nice -n 19 .venv/bin/python benchmarks/filter_scale.py [--rows 1000000] [--factor 10] [--memory-limit 1GB]
        [--threads N] [--shard-rows 100000] [--work /dir/with/some/GB]

For each size, generates the rows as raw shards of `--shard-rows` (benchmarks/filter_throughput.py's vectorized
`shard_table`: the same zh mix of failed downloads, scores, scripts and faults), then runs `filter_pairs` with
the full zh rule set (as filter_throughput's full run) in a fresh child process with `corpus.duckdb.memory_limit`
(and `threads`, if given) set and DuckDB spilling under the work directory. The child first filters a
2,000-row lake (lingua's models, matplotlib's fonts), then times the real one and reports its own peak RSS.
Each size's lake is deleted after its run; everything lives in a temporary directory removed at the end
(10M rows: ~0.8 GB of shards, plus the pairs and what DuckDB spills).

Printed last: rss_ratio_10x= (the child's peak RSS at factor·N ÷ at N; aim ≤ 1.5) and throughput_ratio_10x=
(rows/s at factor·N ÷ at N; aim ≥ 0.8); `10x` is the factor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _spec(memory_limit: str, threads: int | None, spill: Path):  # a LanguageSpec
    from filter_throughput import WHERE

    from pea.spec import load_spec

    spec = load_spec("zh")
    duckdb = spec.corpus.duckdb.model_copy(update={"memory_limit": memory_limit, "threads": threads,
                                                   "spill_dir": str(spill)})
    return spec.model_copy(update={"corpus": spec.corpus.model_copy(update={"duckdb": duckdb}),
                                   "filter": spec.filter.model_copy(update={"min_similarity": 0.25, "where": WHERE})})


def _child(lake: Path, memory_limit: str, threads: int | None) -> None:
    """Filter a small lake, then `lake`; print seconds, rows and this process's peak RSS as JSON."""
    from filter_throughput import generate

    from pea.corpus.filter import filter_pairs

    spec = _spec(memory_limit, threads, lake.parent / "spill")
    warm = lake.parent / "warm"
    generate(warm / "zh" / "raw", 2_000, 2)
    filter_pairs(spec, warm)
    shutil.rmtree(warm)
    start = time.perf_counter()
    result = filter_pairs(spec, lake)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rows": result.rows_in, "kept": result.rows_out,
                      # the largest of this process (the global pass) and its pool's workers (the jobs)
                      "peak_rss_gb": max(resource.getrusage(who).ru_maxrss for who in
                                         (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20,
                      "self_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "workers_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))


def _measure(work: Path, rows: int, shard_rows: int, memory_limit: str, threads: int | None) -> dict:
    from filter_throughput import generate

    lake = work / f"lake-{rows}"
    start = time.perf_counter()
    generate(lake / "zh" / "raw", rows, max(1, math.ceil(rows / shard_rows)))
    generated = time.perf_counter() - start
    command = [sys.executable, __file__, "--child", str(lake), "--memory-limit", memory_limit]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"filtering {rows} rows failed:\n{done.stderr[-4000:]}")
    out = done.stdout
    shutil.rmtree(lake)  # the next size needs the disk
    shutil.rmtree(work / "spill", ignore_errors=True)
    return {**json.loads(out.strip().splitlines()[-1]), "generate_seconds": generated}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="the smaller size N")
    parser.add_argument("--factor", type=int, default=10, help="the larger size is factor·N")
    parser.add_argument("--memory-limit", default="1GB", help="corpus.duckdb.memory_limit for both sizes")
    parser.add_argument("--threads", type=int, default=None, help="corpus.duckdb.threads (default: every core)")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="rows per raw shard")
    parser.add_argument("--work", default=None, help="where the temporary directory goes (default: the system's)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.memory_limit, args.threads)
        return
    runs = {}
    with tempfile.TemporaryDirectory(dir=args.work, prefix="filter-scale-") as tmp:
        for rows in (args.rows, args.rows * args.factor):
            runs[rows] = run = _measure(Path(tmp), rows, args.shard_rows, args.memory_limit, args.threads)
            print(f"rows={rows} kept={run['kept']} filter {run['seconds']:.2f} s ({rows / run['seconds']:.0f} "
                  f"rows/s), peak RSS {run['peak_rss_gb']:.2f} GB (global pass {run['self_rss_gb']:.2f}, jobs {run['workers_rss_gb']:.2f}) (generated in {run['generate_seconds']:.1f} s; "
                  f"memory_limit {args.memory_limit})", flush=True)
    small, large = runs[args.rows], runs[args.rows * args.factor]
    print(f"rss_ratio_{args.factor}x={large['peak_rss_gb'] / small['peak_rss_gb']:.3f}")
    print(f"throughput_ratio_{args.factor}x="
          f"{(large['rows'] / large['seconds']) / (small['rows'] / small['seconds']):.3f}")


if __name__ == "__main__":
    main()
