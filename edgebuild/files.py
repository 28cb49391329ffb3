"""The one check every path the tool opens goes through before it is opened.

A fifo opened for reading blocks forever, a device can stream without end, a broken link or a
link loop is a file that is not there: each is refused with the path and what it is, as the
caller's error class (ConfigError for build files and profiles, DataError for data and lists,
WeightsError for weights, BundleError for bundles and manifests).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Type

from .errors import EdgebuildError


def kind_of(mode: int) -> str:
    """A plain-words name of a file type (for 'not a regular file (a fifo)')."""
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "special file"


def check_path(path: str | os.PathLike, what: str, error: Type[EdgebuildError] = EdgebuildError, *, folder: bool = False,
               follow: bool = True, hint: str | None = None) -> os.stat_result:
    """Refuse ``path`` unless it is a regular file (``folder=True``: a folder). ``follow=False``
    refuses symbolic links too. Returns the stat result of what will be opened."""
    p = Path(path)
    want = "folder" if folder else "regular file"
    try:
        st = os.stat(p) if follow else os.lstat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} is a symbolic link loop: {p}", hint="remove the symbolic link or point it at the real file") from None
        if e.errno == errno.ENOENT and os.path.islink(p):
            raise error(f"{what} is a broken symbolic link: {p} (points to {os.readlink(p)!r}, which does not exist)",
                        hint="restore the file it points to, or fix the path") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise error(f"{what} not found: {p}", hint=hint or "check the path (relative paths resolve against the build file's folder)") from None
        raise error(f"{what}: cannot read {p} ({e.strerror})", hint="check the path and its permissions") from None
    ok = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    if not ok:
        raise error(f"{what} is not a {want} (a {kind_of(st.st_mode)}): {p}",
                    hint=hint or f"point it at a {want}; fifos, devices and sockets are never opened")
    return st


def is_regular(path: str | os.PathLike) -> bool:
    """True for a regular file (links followed); never blocks, never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
