"""Prefect task results as plain JSON that cannot execute: a serializer and the storage that refuses anything else.

Prefect persists a task's return value in a result file whose own metadata names the serializer that reads it
back, so choosing a serializer for writing is not enough: a file that says `pickle` is unpickled (by
`ResultStore.exists`, before any cache decision), and Prefect's JSON serializer imports and validates whatever
class a `__class__` field names. Here:

- `ResultJSON` (serializer type `pea-json`) writes the stages' frozen dataclasses, dicts, lists, tuples, Paths and
  numbers as tagged JSON, and reads back only those, rebuilding dataclasses from a fixed allow-list by name;
  anything else in a file is refused with ValueError.
- `ResultFiles` is Prefect's LocalFileSystem whose reads refuse a result file that names any other serializer
  (or configures this one), before Prefect parses it. Prefect treats a refused file as no cached result: the
  stage runs again and writes a clean file over it. Nothing in the file is imported or called.

    persisted(stage, result_storage(root))    # ResultFiles saved as a block, ResultJSON as the serializer
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from pydantic import Field

TYPE = "pea-json"
# The only classes a result file may name: pea's stage results (module, class). Extend when a stage returns a new one.
ALLOWED = {name: module for module, name in (
    ("pea.corpus.acquire", "AcquireResult"), ("pea.corpus.filter", "FilterResult"), ("pea.embed", "EmbedResult"),
    ("pea.train.shards", "Shards"), ("pea.train.shards", "Packed"), ("pea.train", "TrainResult"),
    ("pea.evaluate", "Evaluation"), ("pea.registry", "Registration"))}
log = logging.getLogger("pea.io.results")


class StageError(RuntimeError):
    """A stage's failure read back from a result file: its type's name and message, never the class itself."""


def _allowed_class(name: str) -> type:
    if name not in ALLOWED:
        raise ValueError(f"a result names class {name!r}, which is not a pea stage result ({', '.join(ALLOWED)}); "
                         "the file was not written by this flow: delete it")
    return getattr(importlib.import_module(ALLOWED[name]), name)


def encode(value: Any) -> Any:
    """A value as JSON: plain scalars and lists as they are, anything else under one tag."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return encode(value.item())  # a numpy scalar (a count or a score from a stage) as the Python number
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"pea-json writes dicts with string keys only, not {sorted(map(repr, value))[:3]}")
        return {"$dict": {k: encode(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and type(value).__name__ in ALLOWED \
            and _allowed_class(type(value).__name__) is type(value):
        return {"$dataclass": {"type": type(value).__name__,
                               "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}}
    if isinstance(value, BaseException):  # a failed stage: kept as text
        return {"$error": {"type": type(value).__qualname__, "message": str(value)}}
    raise TypeError(f"pea-json cannot write a {type(value).__module__}.{type(value).__qualname__}; stage results are "
                    f"{', '.join(ALLOWED)}, dicts, lists, tuples, paths and numbers (add a new result class to "
                    "pea.io.results.ALLOWED)")


def decode(data: Any) -> Any:
    """The inverse of `encode`; anything it would not have written is refused."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"not a pea-json value: {str(data)[:120]}")
    (tag, body), = data.items()
    if tag == "$path" and isinstance(body, str):
        return Path(body)
    if tag == "$tuple" and isinstance(body, list):
        return tuple(decode(v) for v in body)
    if tag == "$dict" and isinstance(body, dict):
        return {k: decode(v) for k, v in body.items()}
    if tag == "$dataclass" and isinstance(body, dict) and set(body) == {"type", "fields"}:
        cls = _allowed_class(body["type"])
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(body["fields"], dict) or not set(body["fields"]) <= names:
            raise ValueError(f"a result's {body['type']} has fields {sorted(body['fields'])}, not a subset of "
                             f"{sorted(names)}; delete the file (or bump CACHE_VERSION)")
        return cls(**{k: decode(v) for k, v in body["fields"].items()})
    if tag == "$error" and isinstance(body, dict):
        return StageError(f"{body.get('type')}: {body.get('message')}")
    raise ValueError(f"not a pea-json value: {str(data)[:120]}")


class ResultJSON(Serializer):
    """Prefect serializer `pea-json`: no settings, so a file cannot configure it into importing anything."""

    type: str = Field(default=TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(encode(obj), allow_nan=True).encode()

    def loads(self, blob: bytes) -> Any:
        return decode(json.loads(blob))


class TamperedResult(ValueError):
    """A result file this flow did not write: it names another serializer, or is not a result record at all."""


def check_record(content: bytes, where: str) -> bytes:
    """`content` if it is a result record read by `pea-json` alone; TamperedResult otherwise."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
    except (ValueError, TypeError, KeyError) as err:
        raise TamperedResult(f"{where} is not a Prefect result record ({type(err).__name__}); refused unread: "
                             "delete it") from None
    if serializer != {"type": TYPE}:
        raise TamperedResult(f"{where} names serializer {json.dumps(serializer)[:200]}; pea reads only results its "
                             f"own {TYPE!r} serializer wrote (pickles and importing decoders could run code): "
                             "refused, the stage runs again and overwrites it")
    try:  # the payload too, so every refusal is logged (Prefect swallows a serializer's error)
        ResultJSON().loads(str(record.get("result", "")).encode())
    except ValueError as err:
        raise TamperedResult(f"{where}: {err}; refused, the stage runs again and overwrites it") from None
    return content


def _warn(message: str) -> None:
    """To the task run's log (the Prefect UI) when there is one, else to this module's logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        log.warning(message)


class ResultFiles(LocalFileSystem):
    """LocalFileSystem whose reads pass only result files written by ResultJSON (check_record)."""

    _block_type_name: ClassVar[str] = "PEA Result Files"

    def _checked(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        if not resolved.is_file():
            raise ValueError(f"Path {resolved} does not exist or is not a file.")
        try:
            return check_record(resolved.read_bytes(), str(resolved))
        except TamperedResult as err:
            _warn(str(err))  # Prefect counts a failed read as no cached result, so say why the stage reruns
            raise

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # noqa: ARG002 - Prefect passes _sync
        return self._checked(path)



def result_storage(root: Path) -> ResultFiles:
    """The ResultFiles block for `root`, saved on the Prefect server (Prefect takes only saved blocks for a task's
    storage) under a name derived from the path, so each lake has its own."""
    root = Path(root).resolve()
    block = ResultFiles(basepath=str(root))
    block.save(f"pea-results-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}", overwrite=True, _sync=True)
    return block


def persisted(task: Any, storage: ResultFiles) -> Any:
    """`task` persisting its results in `storage` (result_storage) as pea-json."""
    return task.with_options(result_storage=storage, result_serializer=ResultJSON(), persist_result=True)
