"""One trainer per run directory: an OS lock on ``<run_dir>/.lock``, held for the whole run.

Two trainers on one run directory would delete each other's unpublished saves, truncate each
other's ``metrics.jsonl`` and interleave checkpoints. Rank 0 takes an exclusive ``flock`` on the
lock file before anything in the directory is touched; the kernel releases it when the process
ends, however it ends (``kill -9`` included), so a lock is never stale. The file holds who has it
(host, pid, start time), which a refused second trainer names in its error.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from kha_train.fs import storage_error

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """The run directory is held by another live trainer; the message names it."""


class RunLock:
    """An exclusive lock on one run directory (see the module docstring). ``release()`` or the
    end of the process frees it."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(e, "use the run directory", self.path.parent) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by another trainer ({holder}). "
                "Wait for it to finish or stop it (SIGTERM saves a checkpoint), or train "
                "elsewhere with logging.run_dir=... / a different name"
            ) from None
        self._fd: int | None = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
