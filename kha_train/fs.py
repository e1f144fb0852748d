"""Filesystem faults as one readable error: which path, what went wrong, what to do.

Anything kha-train writes (run directory, checkpoints, logs, data) can hit a full disk, a
read-only mount, a missing permission or a path whose parent is a regular file. Those arrive as
``OSError``s from deep inside torch, DCP or the standard library; :func:`describe` turns one
into a sentence with the fix, and :class:`StorageError` carries it to the CLI, which prints it
as a single ``error:`` line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# What the user can do about each kind of fault.
FIXES = {
    errno.ENOSPC: "free space on that disk, or point logging.run_dir / checkpoint.dir at a "
    "larger one",
    errno.EDQUOT: "free space within your quota, or point logging.run_dir / checkpoint.dir "
    "elsewhere",
    errno.EFBIG: "the file exceeds a size limit (ulimit -f, or the filesystem's maximum): "
    "raise the limit or use another filesystem",
    errno.EROFS: "the filesystem is mounted read-only: choose a writable logging.run_dir / "
    "checkpoint.dir",
    errno.EACCES: "give your user write access to it, or choose another logging.run_dir / "
    "checkpoint.dir",
    errno.EPERM: "give your user write access to it, or choose another logging.run_dir / "
    "checkpoint.dir",
    errno.ENOTDIR: "a part of the path is a regular file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file was expected: choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
}


class StorageError(OSError):
    """A filesystem fault while reading or writing run files; the message names the path, the
    cause and the fix (raised in place of the bare ``OSError``)."""


def find_os_error(e: BaseException | None) -> OSError | None:
    """The first ``OSError`` in ``e``'s chain of causes and contexts (DCP wraps them), or in
    the per-rank failures of a DCP ``CheckpointException``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: exception or tb}
        if isinstance(failures, dict):
            for f in failures.values():
                inner = f[0] if isinstance(f, tuple) else f
                if isinstance(inner, BaseException) and (found := find_os_error(inner)):
                    return found
        e = e.__cause__ or e.__context__
    return None


def short_write(e: BaseException | None) -> bool:
    """Whether ``e`` (or its chain) is torch's sign of a write cut short: its zip writer reports
    a full disk or a file-size limit as 'unexpected pos' instead of passing the OSError on."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "unexpected pos" in str(e):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                inner = f[0] if isinstance(f, tuple) else f
                if isinstance(inner, BaseException) and short_write(inner):
                    return True
        e = e.__cause__ or e.__context__
    return False


def describe(e: OSError, what: str, path: str | os.PathLike[str] | None = None) -> str:
    """'could not <what> <path>: <cause>. Fix: <fix>' for an ``OSError``."""
    where = e.filename or path
    cause = e.strerror or str(e)
    fix = FIXES.get(e.errno or 0, "check that the path exists and is writable")
    return f"could not {what} {where}: {cause}. Fix: {fix}"


def storage_error(
    e: OSError, what: str, path: str | os.PathLike[str] | None = None
) -> StorageError:
    """A :class:`StorageError` with :func:`describe`'s message and ``e``'s errno."""
    err = StorageError(describe(e, what, path))
    err.errno = e.errno
    return err


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the filesystem that holds ``path`` (its nearest existing parent), or None."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
