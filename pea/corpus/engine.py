"""The data stages' distributed engine (Ray): `session(engine)` joins or starts the cluster for one stage, and
`map_tasks(engine, fn, items)` runs `fn` over `items` on it, or in local processes when there is no engine.

With `corpus.engine` set, acquire runs img2dataset's `ray` distributor (each shard a Ray task, fetching with
pea's hardened fetch) and the filter judges each raw shard in a Ray task (`pea.corpus.filter`); without one
both run on this machine as before. `address: auto` or `ray://<head>:10001` joins a running cluster (KubeRay,
`ray start --head`; docs/operations.md); no address starts a local cluster for the stage and stops it after.
Workers import pea by name, so pea must be installed on every node (a local cluster shares this interpreter).
`ray://` needs the Ray Client (ray[client]) and, for a cluster with token authentication (Ray 2.60's default),
RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN in this process.

    # two machines by hand: `ray start --head --port 6379` on one, `ray start --address <head>:6379` on the
    # other, then on the head: corpus.engine: {kind: ray, address: auto}
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import socket
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
CONNECT_TIMEOUT_S = 5.0  # for the TCP check before ray.init: long enough for a head across a data centre


def worker_env(local: bool = True) -> dict[str, str]:
    """The environment variables every Ray worker of the stage gets (its runtime_env). A cluster this process
    joins keeps its own PYTHONPATH: this machine's paths would hide the pea installed in the cluster's image."""
    env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ and (local or name != "PYTHONPATH")}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


FIX = ("start the cluster (`ray start --head`, or a KubeRay RayCluster), fix the address ('auto' on a cluster node, "
       "'ray://<head>:10001' from outside it; the flow's engine_address), or remove corpus.engine to run on this machine")


def _unreachable(address: str, why: str, fix: str = FIX) -> ConnectionError:
    return ConnectionError(f"corpus.engine.address {address!r}: {why}; {fix}")


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout_s` when nothing listens at a `host:port` or `ray://host:port` address: ray.init
    itself retries such an address for minutes. 'auto' needs no check (Ray fails at once without a cluster)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise _unreachable(address, f"nothing answers at {host}:{port} within {timeout_s:.0f} s "
                                    f"({type(err).__name__}: {err})") from None
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise _unreachable(address, "a ray:// address needs the Ray Client, which is not installed here",
                           "install it (pip install 'ray[client]', i.e. grpcio), or use 'auto' on a cluster node")


@contextmanager
def session(engine: EngineSpec | None) -> Iterator[None]:
    """Ray connected for the duration of a stage. A Ray already initialised in this process (a caller's, a test's)
    is used as it is and left running; one this call starts or joins is shut down (disconnected) at the end."""
    if engine is None:
        yield
        return
    import ray
    from ray.exceptions import RayError

    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=False,
                                   runtime_env={"env_vars": worker_env(local=engine.address is None)})
    if engine.address is None:
        options["num_cpus"] = engine.num_cpus or os.cpu_count()
    else:
        check_reachable(engine.address)
    try:
        ray.init(address=engine.address, **options)
    except (ConnectionError, RuntimeError, RayError) as err:
        if engine.address is None:
            raise RuntimeError(f"corpus.engine: a local Ray cluster did not start ({type(err).__name__}: {err}); "
                               "see Ray's log under /tmp/ray/session_latest/logs, or remove corpus.engine") from None
        # A Ray Client without the token of a token-authenticated cluster only sees its connection time out.
        raise _unreachable(engine.address, f"ray.init failed ({type(err).__name__}: {err}); a cluster with token "
                           "authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN here") from None
    try:
        yield
    finally:
        ray.shutdown()


def map_tasks(engine: EngineSpec | None, fn: Callable[[T], R], items: Sequence[T], *, label: str,
              log: Callable[[str], None] = print) -> list[R]:
    """`[fn(item) for item in items]`, each call a Ray task (one CPU, retried twice if its worker dies) when an
    engine is set; without one, in a pool of local processes (as many as the run's threads, see
    pea.embed.launcher.thread_budget) from LOCAL_POOL_MIN_ITEMS items, else in this process. `fn` must be importable
    by name (a module-level function) and its result small: results come back to this process. A few progress
    lines go to `log`."""
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


# A spawned worker costs ~1-2 s (imports, lingua's models) before its first item: below this many items the pool
# loses to one process (measured: 5 filter jobs of 200k rows, 4.1 s in-process vs 4.8 s on 2 workers).
LOCAL_POOL_MIN_ITEMS = 8


def _map_locally(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    workers = min(threads, len(items))
    if workers <= 1 or len(items) < LOCAL_POOL_MIN_ITEMS:
        return [fn(item) for item in items]
    # spawn, not fork: the caller may hold torch's and DuckDB's threads, which a forked child would inherit broken
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, items))
