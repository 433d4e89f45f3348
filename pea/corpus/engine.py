"""The data stages' distributed engine (Ray): `session(engine)` joins or starts the cluster for one stage, and
`map_tasks(engine, fn, items)` runs `fn` over `items` on it, or in this process when there is no engine.

With `corpus.engine` set, acquire runs img2dataset's `ray` distributor (each shard a Ray task, fetching with
pea's hardened fetch) and the filter judges each raw shard in a Ray task (`pea.corpus.filter`); without one
both run on this machine as before. `address: auto` or `ray://<head>:10001` joins a running cluster (KubeRay,
`ray start --head`; docs/operations.md); no address starts a local cluster for the stage and stops it after.
Workers import pea by name, so pea must be installed on every node (a local cluster shares this interpreter).

    # two machines by hand: `ray start --head --port 6379` on one, `ray start --address <head>:6379` on the
    # other, then on the head: corpus.engine: {kind: ray, address: auto}
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from pea.spec import EngineSpec

T = TypeVar("T")
R = TypeVar("R")

# What a worker needs that it would otherwise take from the network or the wrong place (img2dataset's imports
# reach for wandb and albumentations' update check; a worker must find the same project and lake).
WORKER_ENV = ("WANDB_MODE", "NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "DO_NOT_TRACK", "PEA_HOME", "PEA_LAKE",
              "PYTHONPATH")


@contextmanager
def session(engine: EngineSpec | None) -> Iterator[None]:
    """Ray connected for the duration of a stage. A Ray already initialised in this process (a caller's, a test's)
    is used as it is and left running; one this call starts is shut down at the end."""
    if engine is None:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=False,
                                   runtime_env={"env_vars": env})
    if engine.address is None:
        options["num_cpus"] = engine.num_cpus or os.cpu_count()
    try:
        ray.init(address=engine.address, **options)
    except (ConnectionError, RuntimeError) as err:
        raise RuntimeError(f"corpus.engine: cannot reach the Ray cluster at {engine.address!r} ({err}); start it "
                           "(`ray start --head`, or a KubeRay RayCluster), fix the address, or remove "
                           "corpus.engine to run on this machine") from None
    try:
        yield
    finally:
        ray.shutdown()


def map_tasks(engine: EngineSpec | None, fn: Callable[[T], R], items: Sequence[T], *, label: str,
              log: Callable[[str], None] = print) -> list[R]:
    """`[fn(item) for item in items]`, each call a Ray task (one CPU, retried twice if its worker dies) when an
    engine is set; without one, in a pool of local processes (as many as the run's threads, see
    pea.launcher.thread_budget; none for a single item). `fn` must be importable by name (a module-level
    function) and its result small: results come back to this process. A few progress lines go to `log`."""
    if engine is None:
        return _map_locally(fn, items)
    if not items:
        return []
    import ray

    if not ray.is_initialized():
        raise RuntimeError("map_tasks needs an engine session: call it inside pea.corpus.engine.session(engine)")
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending, start, reported = list(refs), time.monotonic(), 0
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=10.0)
        for ref in done:
            results[index[ref]] = ray.get(ref)  # raises the task's own error, with its traceback
        finished = len(refs) - len(pending)
        if pending and finished - reported >= max(1, len(refs) // 4):
            log(f"{label}: {finished}/{len(refs)} done on Ray, {finished / (time.monotonic() - start):.1f}/s")
            reported = finished
    return results


def _map_locally(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    workers = min(threads, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    # spawn, not fork: the caller may hold torch's and DuckDB's threads, which a forked child would inherit broken
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, items))
