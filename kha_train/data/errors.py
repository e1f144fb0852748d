"""The one exception type of the data package, and the filesystem checks that raise it."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from kha_train.config import ConfigError


class DataError(ConfigError):
    """Bad data input (a dataset, shard, index, tokenizer or source), with a message that names
    the file and the fix. A :class:`ConfigError` so the CLI prints it as one ``error:`` line."""


def write_error(e: OSError, option: str, path: str | os.PathLike[str] | None = None) -> DataError:
    """A :class:`DataError` for a failed write under the folder an ``option`` (``--out``) names:
    the path, what went wrong and what to do."""
    where = e.filename or path
    code = e.errno or 0
    if isinstance(e, FileExistsError) or code in (errno.ENOTDIR, errno.EEXIST):
        what = "it is" if where is not None and Path(where).is_file() else "a part of the path is"
        why, fix = f"{what} a file, not a folder", f"choose another {option}"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied"
        fix = f"choose an {option} folder you can write to, or give your user write access"
    elif code == errno.EROFS:
        why, fix = "the filesystem is read-only", f"choose an {option} on a writable disk"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        why, fix = "no space left", f"free space on that disk or choose an {option} on another"
    else:
        why, fix = e.strerror or str(e), f"check {option}: its folder must exist or be creatable"
    return DataError(f"cannot write {option} {where}: {why}; {fix}")


def ensure_writable_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Create the folder ``path`` (with its parents) and check that files can be written in it,
    so a bad ``--out`` fails at once with a :class:`DataError` rather than after the work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(e, option, path) from e
    return path
