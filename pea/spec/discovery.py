"""What a discovered spec may name before the scan starts a run for it: allowed model sources and paths only.

`scan-languages` starts a training run for any YAML dropped into data/languages/. Validation (pea.spec) checks
the fields' shapes; this checks where they point, so a dropped spec cannot make a worker read /etc/passwd as a
manifest, load a model from another user's directory, spill into /, or download an arbitrary Hub repository:

- models (teacher.id, student.id, evaluate.clip_model, evaluate.judge): a Hugging Face id matching one of the
  allowed patterns ($PEA_ALLOWED_MODELS, comma-separated fnmatch patterns; default ALLOWED_MODELS), or a local
  directory inside the roots;
- paths (corpus.manifests[].path, corpus.duckdb.spill_dir, train/embed.launcher.hostfile): inside the roots
  (relative ones are under the project home, as the stages read them; symlinks are followed first), or a
  manifest at a remote URL of REMOTE_SCHEMES (http(s) not at a non-public address the spec does not allow);
- roots: the project home, the lake and the directories in $PEA_ALLOWED_ROOTS (os.pathsep-separated).

    check_sources(spec, "data/languages/xx.yaml")   # SpecError naming the file, each field and the fix
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pea.io.addresses import networks, refusal
from pea.spec import LanguageSpec, SpecError, home, lake_root

SCAN_TAG = "started-by-scan"  # the tag of flow runs the scan started: their spec is checked again when they load it

# The organisations of the shipped specs' models and of Stable Diffusion and CLIP releases.
ALLOWED_MODELS = ("stable-diffusion-v1-5/*", "stabilityai/*", "runwayml/*", "OFA-Sys/*", "BAAI/*", "Bingsu/*",
                  "openai/*", "laion/*")
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "hf")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def allowed_models() -> tuple[str, ...]:
    value = os.environ.get("PEA_ALLOWED_MODELS")
    return tuple(p.strip() for p in value.split(",") if p.strip()) if value is not None else ALLOWED_MODELS


def roots() -> tuple[Path, ...]:
    extra = [Path(p).expanduser().resolve() for p in os.environ.get("PEA_ALLOWED_ROOTS", "").split(os.pathsep) if p]
    return (home(), lake_root(), *extra)


def _outside(path: Path) -> str | None:
    """None when `path` (symlinks resolved) is inside a root, else why not."""
    resolved = path.expanduser().resolve()
    if any(resolved == root or root in resolved.parents for root in roots()):
        return None
    return (f"{resolved} is outside the project ({home()}), the lake ({lake_root()}) and $PEA_ALLOWED_ROOTS; move "
            "it inside one of them or add its directory to PEA_ALLOWED_ROOTS in the worker's environment")


def _model(value: str) -> str | None:
    local = (Path(value).is_absolute() or value.startswith((".", "~")) or Path(value).exists()
             or not HUB_ID.fullmatch(value) or ".." in value)
    if local:  # as pea.models loads it: a directory, relative to the working directory
        return _outside(Path(value))
    patterns = allowed_models()
    if any(fnmatch.fnmatchcase(value, p) for p in patterns):
        return None
    return (f"Hugging Face model {value!r} matches none of the allowed patterns {', '.join(patterns)}; add one to "
            "PEA_ALLOWED_MODELS (comma-separated) in the worker's environment if it is trusted")


def _path(value: str) -> str | None:
    return _outside(Path(value) if Path(value).is_absolute() else home() / value)


def _manifest(value: str, spec: LanguageSpec) -> str | None:
    if "::" in value:
        return f"{value!r} chains filesystems (fsspec '::'); name one local path or one remote URL"
    if "://" not in value:
        return _path(value)
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _path(parts.path)
    if scheme not in REMOTE_SCHEMES:
        return f"{value!r}: scheme {scheme!r} is not one of {', '.join(REMOTE_SCHEMES)} (or a local path)"
    host = (parts.hostname or "").lower()
    if scheme in ("http", "https"):
        address = "127.0.0.1" if host == "localhost" else host
        try:
            why = refusal(address, networks(spec.corpus.allow_networks))
        except ValueError:  # a name: resolved when read; only literal addresses are judged here
            why = None
        if why is not None:
            return f"{host} is a {why} address; list its network in corpus.allow_networks if it is meant"
    return None


def problems(spec: LanguageSpec) -> list[str]:
    """'field: why' for every model source and path of `spec` that is not allowed."""
    found = []
    models = {"teacher.id": spec.teacher.id, "student.id": spec.student.id,
              "evaluate.clip_model": spec.evaluate.clip_model, "evaluate.judge": spec.evaluate.judge}
    for field, value in models.items():
        if value is not None and (why := _model(value)):
            found.append(f"{field}: {why}")
    for i, manifest in enumerate(spec.corpus.manifests):
        if why := _manifest(manifest.path, spec):
            found.append(f"corpus.manifests[{i}].path: {why}")
    paths = {"corpus.duckdb.spill_dir": spec.corpus.duckdb.spill_dir,
             "train.launcher.hostfile": spec.train.launcher.hostfile,
             "embed.launcher.hostfile": spec.embed.launcher.hostfile}
    for field, value in paths.items():
        if value is not None and (why := _path(value)):
            found.append(f"{field}: {why}")
    return found


def check_sources(spec: LanguageSpec, source: str | Path) -> LanguageSpec:
    """`spec` when every source it names is allowed; SpecError naming `source` and each refused field otherwise."""
    if found := problems(spec):
        raise SpecError(f"{source} names sources a discovered spec may not use; nothing was started for it:\n  "
                        + "\n  ".join(found))
    return spec
