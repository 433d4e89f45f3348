"""Task results persist as pea-json; a tampered result file is refused (the stage runs again), never executed."""

import base64
import json
import pickle
from pathlib import Path

import pytest
from prefect import flow, task
from prefect._internal.result_records import ResultRecord
from prefect.testing.utilities import prefect_test_harness

from pea.embed import EmbedResult
from pea.evaluate import Evaluation
from pea.io.results import (
    ResultJSON,
    TamperedResult,
    check_record,
    persisted,
    result_storage,
)
from pea.train.shards import Packed, Shards

KEY = "pea-test-embed"
CALLS: list[int] = []


class _Payload:
    """What an attacker with write access to the lake would plant: unpickling it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_record(marker: Path) -> bytes:
    blob = base64.encodebytes(pickle.dumps(_Payload(marker))).decode()
    return json.dumps({"metadata": {"storage_key": KEY, "serializer": {"type": "pickle", "picklelib": "pickle"},
                                    "prefect_version": "3.9.1"}, "result": blob}).encode()


def _embed_result(root: Path) -> EmbedResult:
    return EmbedResult(root / "t", root / "s", root / "l", {"teacher": 3}, {"teacher": 1}, 1.5)


@task(cache_key_fn=lambda ctx, params: KEY)
def stage(root: Path) -> EmbedResult:
    CALLS.append(1)
    return _embed_result(root)


@flow
def one_stage(results: Path, root: Path) -> str:
    state = persisted(stage, result_storage(results))(root, return_state=True)
    assert state.result() == _embed_result(root)
    return state.name


def test_stage_results_round_trip_with_paths_tuples_and_nested_dataclasses(tmp_path):
    embedded = _embed_result(tmp_path)
    shards = Shards(str(tmp_path / "train"), 8, ("a.parquet",), ((4, 4),), {"states": ((16, 32), "float16")})
    evaluation = Evaluation(4, {"trained": 0.1, "untrained": 0.4}, {"trained": 1.0}, tmp_path / "g.png",
                            tmp_path / "r.json", grids={"general": tmp_path / "x.png"}, embedded=embedded,
                            systems=("trained", "untrained"))
    for value in (embedded, Packed(tmp_path, shards, shards), evaluation, {"ds": {"zero": 1}}, None):
        assert ResultJSON().loads(ResultJSON().dumps(value)) == value


@pytest.mark.parametrize("payload", [
    {"$dataclass": {"type": "Popen", "fields": {"args": ["touch", "/tmp/x"]}}},
    {"$dataclass": {"type": "subprocess.Popen", "fields": {}}},
    {"__class__": "subprocess.Popen", "data": {"args": "id"}},
    {"$dataclass": {"type": "EmbedResult", "fields": {"teacher_store": {"$path": "/x"}, "extra": 1}}},
])
def test_the_serializer_rebuilds_only_pea_results_by_name(payload):
    with pytest.raises(ValueError, match="not a pea stage result|not a pea-json value|not a subset"):
        ResultJSON().loads(json.dumps(payload).encode())


def test_prefect_itself_would_run_a_pickled_result_file_and_check_record_refuses_it(tmp_path):
    # The hole: the file names its own serializer, and Prefect honours it whatever the task was configured with.
    marker = tmp_path / "pwned"
    ResultRecord.deserialize(_pickled_record(marker))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(TamperedResult, match="names serializer .*pickle"):
        check_record(_pickled_record(marker), "file")
    with pytest.raises(TamperedResult, match="class 'Popen', which is not a pea stage result"):
        check_record(json.dumps({"metadata": {"serializer": {"type": "pea-json"}}, "result": json.dumps(
            {"$dataclass": {"type": "Popen", "fields": {}}})}).encode(), "file")
    assert not marker.exists()


def test_a_tampered_result_file_is_refused_and_the_stage_runs_again(tmp_path, caplog):
    results, marker = tmp_path / "results", tmp_path / "pwned"
    CALLS.clear()
    with prefect_test_harness(server_startup_timeout=180):  # slow to start on busy shared cores
        assert one_stage(results, tmp_path) == "Completed"
        record = json.loads((results / KEY).read_text())
        assert record["metadata"]["serializer"] == {"type": "pea-json"} and "$dataclass" in record["result"]
        assert one_stage(results, tmp_path) == "Cached" and len(CALLS) == 1  # a clean file is a cache hit

        tampered = [
            _pickled_record(marker),
            # Prefect's JSON serializer with its importing decoder: it would build any class a file names.
            json.dumps({"metadata": {"serializer": {"type": "json"}}, "result": json.dumps(
                {"__class__": "pathlib.Path", "data": str(marker)})}).encode(),
            # Our own serializer named, but a class outside the allow-list inside.
            json.dumps({"metadata": {"serializer": {"type": "pea-json"}}, "result": json.dumps(
                {"$dataclass": {"type": "Popen", "fields": {"args": ["touch", str(marker)]}}})}).encode(),
        ]
        for i, content in enumerate(tampered):
            (results / KEY).write_bytes(content)
            assert one_stage(results, tmp_path) == "Completed", i  # recomputed, not read
            assert len(CALLS) == 2 + i and not marker.exists()
            assert json.loads((results / KEY).read_text())["metadata"]["serializer"] == {"type": "pea-json"}
    refusals = [r.getMessage() for r in caplog.records if "refused, the stage runs again" in r.getMessage()]
    assert len(refusals) == 3 and "pickle" in refusals[0] and "'Popen'" in refusals[2]  # in the task run's log
