"""Which DeepSpeed checkpoint a run resumes from: the newest one that was saved completely and is intact on disk.

DeepSpeed 0.19 writes a tag's files, then its `latest` pointer in place (not by rename), and keeps no record of
what a complete tag holds. A kill while it writes leaves a half-written tag, or an empty or torn `latest`; a bad
disk leaves a file that loads as garbage. So pea ignores `latest`: after each save (DeepSpeed's save ends with a
barrier, so every rank's files are on disk) rank 0 seals the tag with `pea-seal.json`, every file's size and
sha256, written under a temporary name and renamed. A resume takes the newest tag whose seal exists and whose
files match it, and names every newer tag it skips and why. Checkpoints must be on storage every rank sees (as
DeepSpeed's own multi-node resume needs).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from pea.io.atomic import publish

SEAL = "pea-seal.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(tag_dir: Path) -> Path:
    """Record every file of a saved tag (size, sha256): the tag counts as complete from now on."""
    files = {p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tag_dir.rglob("*")) if p.is_file() and not p.name.startswith((SEAL, f".{SEAL}"))}
    with publish(tag_dir / SEAL, "train: checkpoint seal") as tmp:
        tmp.write_text(json.dumps(files, indent=1))
    return tag_dir / SEAL


def problem(tag_dir: Path) -> str | None:
    """Why `tag_dir` cannot be resumed from (None: it is complete and intact)."""
    seal_path = tag_dir / SEAL
    if not seal_path.is_file():
        return "not sealed (its save did not finish)"
    try:
        files = json.loads(seal_path.read_text())
    except ValueError:
        return f"{seal_path} is not valid JSON"
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum (corrupt or overwritten)"
    return None


def newest_intact(checkpoints: Path, log=print) -> str | None:  # noqa: ANN001 - any print-like callable
    """The tag to resume from: the newest intact one (tags sort by step), or None to start from step 0."""
    for tag_dir in sorted((p for p in checkpoints.glob("step*") if p.is_dir()), reverse=True):
        why = problem(tag_dir)
        if why is None:
            return tag_dir.name
        log(f"checkpoint {tag_dir.name} skipped: {why}")
    return None


def run_directory(run_dir: Path) -> Path:
    """Create `run_dir` (and missing parents) owner-only; an existing one is left as it is (check_private judges)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(mode=0o700, parents=True)
        os.chmod(run_dir, 0o700)  # mkdir's mode passes through the umask: say it exactly
    except FileExistsError:
        pass
    return run_dir


def _unsafe(path: Path, uid: int) -> str | None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if info.st_uid != uid:
        return f"is owned by uid {info.st_uid}, not you (uid {uid})"
    if writable := [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]:
        return f"is writable by {' and '.join(writable)} (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def check_private(run_dir: Path) -> None:
    """Refuse to resume from `run_dir` unless it, its checkpoints folder and everything in it are owned by this user,
    are not symbolic links and are writable by nobody else (PermissionError naming the path and the fix)."""
    run_dir = Path(run_dir)
    uid = os.geteuid()
    checkpoints = run_dir / "checkpoints"
    paths = [run_dir]
    if os.path.lexists(checkpoints):
        paths.append(checkpoints)
        if checkpoints.is_dir() and not checkpoints.is_symlink():
            paths += sorted(checkpoints.rglob("*"))
    for path in paths:
        if (why := _unsafe(path, uid)) is not None:
            raise PermissionError(
                f"{path} {why}: DeepSpeed checkpoints are pickles, so training resumes only from a run directory "
                f"that only you can write. If nobody else can have put files there, fix it with `chown -R "
                f"{uid} {run_dir} && chmod -R go-w {run_dir}` (and replace any link by the file); otherwise train "
                "into a new run directory")
