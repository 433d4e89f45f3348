"""pea.corpus.engine: acquire through a Ray cluster writes the raw shards img2dataset's multiprocessing writes, on
the synthetic corpus and on the hostile site; an engine address nothing answers at fails fast, naming itself.

Every Ray stage here runs on the one local cluster of conftest.py's `ray_cluster` (2 CPUs), which
engine.session must reuse rather than start its own.
"""

import json
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import ray
from hostile_site import hostile_spec  # tests/hostile_site.py

from pea.corpus import filter as filter_stage
from pea.corpus.acquire import AcquireResult, acquire
from pea.corpus.engine import CONNECT_TIMEOUT_S, session
from pea.corpus.filter import FilterResult, filter_pairs
from pea.spec import EngineSpec, LanguageSpec, SyntheticCorpus, load_spec

SIZE, SHARD_ROWS = 20, 10  # 20 good images + the broken entries: 29 rows fetched, 3 shards
STATS_TIMING = {"duration", "start_time", "end_time"}


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory: pytest.TempPathFactory) -> LanguageSpec:
    return load_spec("zh", profile="embedded", zoo_dir=tmp_path_factory.mktemp("zoo"))  # acquire needs no models


def _with_engine(spec: LanguageSpec, engine: EngineSpec | None) -> LanguageSpec:
    return spec.model_copy(update={"corpus": spec.corpus.model_copy(update={"engine": engine})})


def _acquire_both(spec: LanguageSpec, engine: EngineSpec,
                  root: Path) -> dict[str, tuple[LanguageSpec, Path, AcquireResult]]:
    """The same spec acquired twice: on this machine (multiprocessing) and through the cluster."""
    runs = {}
    for name, eng in (("local", None), ("ray", engine)):
        run_spec, lake = _with_engine(spec, eng), root / f"lake-{name}"
        runs[name] = (run_spec, lake, acquire(run_spec, lake))
        print(f"acquire {name}: {runs[name][2].seconds:.1f} s")  # for the record (pytest -s)
    return runs


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


# First in the module: engine.session only connects while no Ray is initialised in this process, i.e. before the
# module's cluster starts. ('auto' is not tried: on a shared machine it may find someone else's cluster.)
@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:{closed}"])
def test_an_unreachable_engine_address_fails_fast_naming_it_and_the_fix(address, base_spec, tmp_path) -> None:
    assert not ray.is_initialized(), "run this before the module's ray_cluster starts (it is first in the file)"
    address = address.format(closed=_closed_port())
    spec = _with_engine(base_spec, EngineSpec(address=address))
    outcome: dict[str, BaseException] = {}

    def attempt() -> None:
        try:
            with session(spec.corpus.engine):
                pass
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    start = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)  # a hang fails the test instead of holding it
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 10)
    assert not thread.is_alive(), f"engine.session({address!r}) still waiting after {time.monotonic() - start:.0f} s"
    error = outcome.get("error")
    assert isinstance(error, ConnectionError), error
    assert repr(address) in str(error) and "ray start --head" in str(error) and "remove corpus.engine" in str(error)
    assert not ray.is_initialized()
    # acquire meets the same error before it generates, serves or downloads anything
    with pytest.raises(ConnectionError, match=re.escape(repr(address))):
        acquire(spec, tmp_path / "lake")
    assert not (tmp_path / "lake" / "zh" / "synthetic").exists()


# The acquired lakes are fixtures so the filter comparison (the same shards judged with and without Ray) can
# take them as they are.
@pytest.fixture(scope="module")
def synthetic_lakes(base_spec, ray_cluster, tmp_path_factory):
    corpus = base_spec.corpus.model_copy(update={"synthetic": SyntheticCorpus(size=SIZE, seed=0),
                                                 "rows_per_shard": SHARD_ROWS})
    return _acquire_both(base_spec.model_copy(update={"corpus": corpus}), ray_cluster,
                         tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def hostile_lakes(base_spec, ray_cluster, hostile_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    # One manifest for both runs (the refused port is drawn when it is written); 3 shards of 10 rows.
    return _acquire_both(hostile_spec(base_spec, hostile_server, root, rows_per_shard=10), ray_cluster, root)


def _error_class(message: str | None) -> str | None:
    """pea's fetch prefixes its class (`timeout: ...`); img2dataset's own messages may hold object addresses."""
    if message is None:
        return None
    prefix = re.match(r"([a-z_]+): ", message)
    return prefix.group(1) if prefix else re.sub(r"0x[0-9a-f]+", "0x…", message)


def _raw_shards(lake: Path) -> dict[str, dict]:
    """Per complete shard: its rows sorted by key (url as its path: the synthetic site's port changes per run,
    error messages as their class) and its stats without the timings."""
    shards = {}
    for stats_path in sorted((lake / "zh" / "raw").glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        table = pq.read_table(stats_path.with_name(stats_path.name.replace("_stats.json", ".parquet")))
        rows = sorted(table.to_pylist(), key=lambda r: r["key"])
        for row in rows:
            row["url"] = urlsplit(row["url"]).path
            row["error_message"] = _error_class(row["error_message"])
        statuses = Counter()
        for message, n in stats.pop("status_dict").items():
            statuses[_error_class(message)] += n
        shards[stats_path.name] = {"columns": table.column_names, "rows": rows, "statuses": dict(statuses),
                                   "stats": {k: v for k, v in stats.items() if k not in STATS_TIMING}}
    return shards


def _same_shards(runs) -> dict[str, dict]:
    local, remote = (_raw_shards(runs[name][1]) for name in ("local", "ray"))
    assert list(local) == list(remote)
    for name in local:
        assert local[name]["columns"] == remote[name]["columns"], name
        assert local[name]["stats"] == remote[name]["stats"], name
        assert local[name]["statuses"] == remote[name]["statuses"], name
        for a, b in zip(local[name]["rows"], remote[name]["rows"], strict=True):
            assert a == b, (name, {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "png"})
    return local


def test_acquire_through_ray_writes_the_shards_multiprocessing_writes(synthetic_lakes, ray_cluster) -> None:
    assert ray.is_initialized()  # engine.session used the fixture's cluster and left it running
    assert ray.get_runtime_context().gcs_address == ray_cluster.address
    results = {name: run[2] for name, run in synthetic_lakes.items()}
    assert results["ray"].shards_total == results["local"].shards_total == 3
    assert results["ray"].successes == results["local"].successes == SIZE + 7  # all but the 404 and corrupt file
    shards = _same_shards(synthetic_lakes)
    rows = [r for shard in shards.values() for r in shard["rows"]]
    assert len(rows) == results["ray"].rows and sum(r["sha256"] is not None for r in rows) == SIZE + 7
    assert Counter(r["error_message"] for r in rows if r["error_message"]) == \
        Counter({"http_error": 1, "Image decoding error": 1})


def test_acquire_of_the_hostile_site_through_ray_counts_every_case_the_same(hostile_lakes) -> None:
    shards = _same_shards(hostile_lakes)
    assert len(shards) == 3
    classes = Counter(r["error_message"] for s in shards.values() for r in s["rows"] if r["error_message"])
    # the deadline held in the Ray workers too: all three slow servers end as timeouts, none hung the run
    assert classes["timeout"] == 3 and classes["redirect"] == 2 and classes["too_large"] == 2
    assert hostile_lakes["ray"][2].seconds < 60


def _filter_both(runs, ray_cluster, monkeypatch) -> dict[str, FilterResult]:
    """filter_pairs of the same raw shards on this machine and with one Ray task per shard (JOB_ROWS = a shard)."""
    monkeypatch.setattr(filter_stage, "JOB_ROWS", SHARD_ROWS)
    local_spec, lake, _ = runs["local"]
    results = {"local": filter_pairs(local_spec, lake)}
    results["ray"] = filter_pairs(_with_engine(local_spec, ray_cluster), runs["ray"][1])
    return results


def _pairs(result: FilterResult) -> list[dict]:
    rows = pq.read_table(result.pairs_path).to_pylist()
    for row in rows:
        row["raw_file"] = Path(row["raw_file"]).name  # the two lakes differ in their folder only
    return rows


@pytest.mark.parametrize("lakes", ["synthetic_lakes", "hostile_lakes"])
def test_the_filter_through_ray_keeps_and_counts_what_the_single_process_filter_does(
        lakes, request, ray_cluster, monkeypatch) -> None:
    runs = request.getfixturevalue(lakes)
    results = _filter_both(runs, ray_cluster, monkeypatch)
    local, remote = results["local"], results["ray"]
    assert _pairs(remote) == _pairs(local) and local.rows_out > 0
    assert remote.dropped == local.dropped and remote.rows_in == local.rows_in
    assert remote.report["rows_downloaded_or_tried"] == local.report["rows_downloaded_or_tried"] == \
        runs["ray"][2].rows
    parts = list((remote.pairs_path.parent).glob("judged-*/*.parquet"))
    assert len(parts) == runs["ray"][2].shards_total  # one part per shard: each was one Ray task


def test_the_flow_parameter_engine_address_becomes_corpus_engine(base_spec, tmp_path) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.pea_flow import _acquire_key, pea, run_overrides
    from pea import ops

    schema = pea.parameters.model_dump()["properties"]["engine_address"]
    assert "ray://head:10001" in json.dumps(schema)  # the description a deployment's UI shows
    pea.validate_parameters({"language": "zh", "engine_address": "ray://head:10001"})
    with pytest.raises(ParameterTypeError, match="engine_address"):
        pea.validate_parameters({"language": "zh", "engine_address": "http://head:10001"})
    spec = ops.with_overrides(base_spec, **run_overrides(50, None, "ray://head:10001"))
    assert spec.corpus.engine == EngineSpec(kind="ray", address="ray://head:10001") and spec.train.steps == 50
    assert ops.with_overrides(base_spec, **run_overrides(None, None, None)) is base_spec
    # where acquire runs is no part of what it produces: the cached shards serve runs with and without a cluster
    assert _acquire_key(None, {"spec": spec, "lake": tmp_path}) == _acquire_key(None, {"spec": base_spec, "lake": tmp_path})
    assert ops.source_fingerprint(spec) != ops.source_fingerprint(base_spec)  # steps=50 is a source
    assert ops.source_fingerprint(ops.with_overrides(base_spec, **run_overrides(None, None, "auto"))) == \
        ops.source_fingerprint(base_spec)
