"""Advisory locks (``fcntl.flock``) on the output folder and on cache entries.

Two builds into the same output folder or cache would otherwise overwrite each other's files.
A lock file holds the holder's PID (for the message); the lock itself is the kernel's, so it is
released when the holder exits, even by kill -9, and a stale lock file is never a problem.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import EdgebuildError


class Busy(EdgebuildError):
    """Another process holds the lock and the user asked not to wait."""


def holder(path: Path) -> str:
    """The PID written in a lock file, as text ('unknown' when unreadable)."""
    try:
        with open(path, "rb") as f:
            pid = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return pid if pid.isdigit() else "unknown"


def say(msg: str) -> None:
    """Shown even with --json (on stderr): whose lock a build waits for."""
    print(msg, file=sys.stderr, flush=True)


class FileLock:
    """``with FileLock(path, what):`` holds an exclusive lock on ``path`` (created if needed).

    When another process holds it: ``wait=False`` raises Busy naming that PID; otherwise
    ``log`` is told who holds it and the call blocks until it is released."""

    def __init__(self, path: Path, what: str, wait: bool = True, log: Optional[Callable[[str], None]] = None):
        self.path, self.what, self.wait, self.log = Path(path), what, wait, log or say
        self.fd: Optional[int] = None

    def acquire(self) -> "FileLock":
        if self.fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                pid = holder(self.path)
                if not self.wait:
                    raise Busy(f"{self.what} is in use by another edgebuild process (PID {pid}; lock {self.path})",
                               hint="wait for it to finish, or leave out --no-wait to wait for it") from None
                if self.log:
                    self.log(f"waiting for PID {pid}, which is using {self.what} (lock {self.path})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
