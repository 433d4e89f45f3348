"""Two runs on one machine (issue #18): with the thread budget, two languages training at once take about as long
as the two one after the other; without it (every run with all cores) they thrash.

    PYTHONPATH=. .venv/bin/python benchmarks/two_runs.py [--steps 200]

zh and ja are acquired, filtered, embedded and packed once (benchmarks/chaos.py's stage children on the embedded
default); then the train stage of both, from the same snapshot, three ways: one after the other with all cores
each (what a lone run gets: `pea.embed.launcher.thread_budget(1)`), both at once with the budget of a work pool
whose concurrency limit is 2 (`thread_budget(2)`: cores / 2 each), and both at once with all cores each (no
budget; stopped at 3× the sequential time). Wall time is from the first train start to the last train end, child
start-up included. LAST lines: `concurrent_vs_sequential=` (aim ≈ 1, ≤ 1.1) and `unbudgeted_vs_sequential=`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def train_both(chaos, work: Path, threads: int, at_once: bool, steps: int, limit_s: float | None = None) -> float:
    """Seconds until both runs ended; past `limit_s` both are stopped and the limit is returned (a lower bound)."""
    chaos.restore(work, "packed-zh-ja")
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CHAOS_TRAIN_STEPS": str(steps)}
    started = time.monotonic()
    batches = [("zh", "ja")] if at_once else [("zh",), ("ja",)]
    for languages in batches:
        children = [chaos.Child("train", work, language, env=env) for language in languages]
        while any(c.proc.poll() is None for c in children):
            if limit_s is not None and time.monotonic() - started > limit_s:
                for c in children:
                    c.kill()
                return limit_s
            time.sleep(0.5)
        if any(c.finish() for c in children):
            raise SystemExit(f"a train run failed: see {work}/child-train-*.log")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--work", type=Path, default=Path(f"/tmp/pea-two-runs-{os.getpid()}"))
    args = parser.parse_args()
    import chaos  # benchmarks/chaos.py: this script's folder is on sys.path

    from pea.embed.launcher import thread_budget
    from pea.models.embedded import prepare_zoo

    work = args.work
    prepare_zoo(work / "zoo", image_size=32)
    (work / "trial" / "lake").mkdir(parents=True, exist_ok=True)
    if not (work / "snapshots" / "packed-zh-ja").is_dir():  # the corpora and stores, once per work folder
        for language in ("zh", "ja"):
            for stage in ("acquire", "filter", "embed", "pack"):
                code, _, tail = chaos.run(stage, work, language)
                if code:
                    raise SystemExit(f"{language} {stage} failed: {tail}")
        chaos.snapshot(work, "packed-zh-ja")
    alone, shared = thread_budget(1), thread_budget(2)
    sequential = train_both(chaos, work, alone, at_once=False, steps=args.steps)
    print(f"{args.steps} steps per run, {alone} cores: one after the other, {alone} threads each: {sequential:.1f} s",
          flush=True)
    concurrent = train_both(chaos, work, shared, at_once=True, steps=args.steps)
    print(f"at once, {shared} threads each (the budget): {concurrent:.1f} s", flush=True)
    limit = 3 * sequential  # oversubscribed runs crawl; stopped there, the ratio is a lower bound
    unbudgeted = train_both(chaos, work, alone, at_once=True, steps=args.steps, limit_s=limit)
    print(f"at once, {alone} threads each (no budget): {'stopped after ' if unbudgeted == limit else ''}"
          f"{unbudgeted:.1f} s")
    print(f"concurrent_vs_sequential={concurrent / sequential:.3f}")
    print(f"unbudgeted_vs_sequential={'>=' if unbudgeted == limit else ''}{unbudgeted / sequential:.3f}")


if __name__ == "__main__":
    main()
