"""An exclusive lock on a run folder, so that two writers never share one.

``out/.lock`` is locked with ``fcntl.flock`` (released by the kernel when the process exits, however it
exits, so a lock is never stale); the file holds the holder's host, pid and command for the error message
of the next writer. Only process 0 of a multi-process run takes it (the others write only their shards
of the checkpoints, under process 0's coordination).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

__all__ = ["RunLocked", "RunLock"]


class RunLocked(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    """``with RunLock(folder): ...`` -- or ``acquire()`` / ``release()``."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another writer ({holder}); wait for it to finish, "
                            "stop it, or choose another train.out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "command": " ".join(sys.argv)[:300]}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info.get('pid')} on {info.get('host')}: {info.get('command')}"
        except (OSError, ValueError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
