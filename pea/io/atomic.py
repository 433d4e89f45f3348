"""Outputs appear whole or not at all, and a full disk says so.

    with publish(path, "embed: store part") as tmp:   # tmp: a hidden name beside `path`
        write(tmp)                                     # renamed to `path` only if this returns

Every writer of a lake file or folder goes through `publish`: it writes under a hidden temp name in the same
folder and renames it in (atomic on one filesystem), so a reader, or a rerun after kill -9, never sees a half
file. On an error the temp is removed; when the error is a full disk (ENOSPC), a quota (EDQUOT) or a file-size
limit (EFBIG; RLIMIT_FSIZE, which Python turns from a signal into this error) the caller gets `NoRoom`, which
names the file and the fix. A kill -9 can still leave a temp behind (no code runs); `sweep` removes stale ones.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
TEMP_MARK = ".pea-tmp"
# torch.save's zip writer on a short write (disk full, file-size limit): a RuntimeError without the errno
TORCH_SHORT_WRITE = ("file write failed", "unexpected pos")


class NoRoom(OSError):
    """A write failed for lack of space (disk, quota or file-size limit)."""


def is_no_room(err: BaseException) -> bool:
    """An OSError for lack of space, or a library's wrapper of one (torch.save raises RuntimeError 'file write
    failed' and keeps no errno: the cause chain or the message is all there is)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            return True
        if isinstance(err, RuntimeError) and any(m in str(err) for m in TORCH_SHORT_WRITE):
            return True
        err = err.__cause__ or err.__context__
    return False


def no_room(what: str, path: Path, err: BaseException) -> NoRoom:
    usage = shutil.disk_usage(next((p for p in Path(path).parents if p.exists()), Path("/")))
    error = NoRoom(f"{what}: no room to write {path} ({getattr(err, 'strerror', None) or str(err).splitlines()[0]}; "
                   f"{usage.free / 1e9:.1f} GB free there). Nothing partial was kept; free space (or raise the "
                   "file-size limit, `ulimit -f`) or move PEA_LAKE to a bigger disk, then rerun: finished outputs "
                   "are reused")
    error.errno = err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC
    return error


def temp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_MARK}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def publish(path: Path, what: str) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it to `path` when the block returns (replacing a file; a folder
    must not exist yet). `what` names the output in errors, e.g. "pack: training shards"."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if is_no_room(err):
            raise no_room(what, path, err) from err
        raise


def sweep(folder: Path, older_than_s: float = 3600) -> int:
    """Remove temps left by killed writers (older than `older_than_s`, so a live writer's is kept); returns how
    many. Only names `publish` made are touched."""
    removed = 0
    cutoff = time.time() - older_than_s
    for tmp in Path(folder).glob(f".*{TEMP_MARK}"):
        try:
            if tmp.lstat().st_mtime < cutoff:
                _remove(tmp)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
