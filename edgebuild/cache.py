"""Content-addressed store of stage outputs with atomic writes.

An entry is ``ROOT/STAGE/KEY/`` holding the stage's files plus ``entry.json`` (the key's
inputs and the sha256 of every file). Entries are built in a temporary folder and renamed
into place, so a crash leaves either a whole entry or none; an entry whose checksums do not
match is dropped with a warning and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import EdgebuildError
from .files import is_regular
from .locks import FileLock

ENTRY = "entry.json"


def default_root() -> Path:
    env = os.environ.get("EDGEBUILD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgebuild"


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_key(stage: str, version: int, params: dict, inputs: dict[str, str]) -> str:
    blob = stable_json({"stage": stage, "version": version, "params": params, "inputs": inputs})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if is_regular(p) and not p.is_symlink() and p.name != ENTRY:
            out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path, prefix: str) -> None:
    """Remove ``PREFIX<pid>-...`` folders left by a killed process (whose pid is gone)."""
    if not folder.is_dir():
        return
    for d in folder.iterdir():
        if not d.name.startswith(prefix):
            continue
        pid = d.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


MARKER = "edgebuild-cache.json"
CACHEDIR_TAG = "CACHEDIR.TAG"  # the standard tag: backup tools skip the folder
# what an edgebuild cache holds at its top: stage folders, the decoded-data store, the
# emulation root and compiled extensions (a cache from before the marker is recognised by them)
FILES = ("host-devices.json", CACHEDIR_TAG)  # the devices found on this host, per boot (profiles.unavailable_reason_memo)
STAGES = ("transfer", "prune", "distill", "search", "export", "quantize", "validate", "bundle", "data", "emulation", "torch_extensions")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class CacheError(EdgebuildError):
    """The cache folder cannot be used (not an edgebuild cache, full, read-only, damaged)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


class Cache:
    """Stage outputs by key. The folder identifies itself with a marker file; ``clear`` and
    builds refuse a non-empty folder without one (it is someone's files, not a cache)."""

    def __init__(self, root: Path | None = None, enabled: bool = True, wait: bool = True, log: Optional[Callable[[str], None]] = None):
        self.root = Path(root) if root else default_root()
        self.enabled = enabled
        self.wait = wait  # a cache entry another build is writing: wait for it, or exit 2 naming its PID
        self.log = log

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    # ------------------------------------------------------------------ identity
    def is_cache(self) -> bool:
        return is_regular(self.root / MARKER)

    def _legacy(self) -> bool:
        """A cache from before the marker: only stage folders of KEY/entry.json folders."""
        try:
            names = [p for p in self.root.iterdir()]
        except OSError:
            return False
        return bool(names) and all((p.name in STAGES and p.is_dir() and not p.is_symlink()) or (p.name in FILES and is_regular(p))
                                   for p in names)

    def check_identity(self, create: bool = False) -> None:
        """Refuse a folder that is not an edgebuild cache; ``create``: mark a new or empty one."""
        root = self.root
        if os.path.lexists(root) and not os.path.isdir(root):
            raise CacheError(f"cache folder {root} is not a folder", hint="pass --cache-dir with a folder (or set EDGEBUILD_CACHE_DIR)")
        if self.is_cache():
            return
        try:
            empty = not root.exists() or not any(root.iterdir())
        except OSError as e:
            raise CacheError(f"cache folder {root}: cannot list it ({e.strerror})", hint="check its permissions") from None
        if not (empty or self._legacy()):
            raise CacheError(f"{root} is not an edgebuild cache (it has files but no {MARKER})",
                             hint="pass --cache-dir with an empty folder or an edgebuild cache; edgebuild never writes into or clears other folders")
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
                from .publish import write_atomic

                write_atomic(root / CACHEDIR_TAG, "Signature: 8a477f597d28d172789f06886806bc55\n"
                              "# This folder is an edgebuild stage cache (edgebuild cache clear empties it).\n")
                write_atomic(root / MARKER, json.dumps({"edgebuild_cache": 1}) + "\n")
            except OSError as e:
                raise self._os_error(e, root) from None

    def _os_error(self, e: OSError, where: Path) -> EdgebuildError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return CacheError(f"cache folder {self.root}: the disk is full ({e.strerror}) writing {where}",
                              hint="free space, or pass --cache-dir on another disk (edgebuild cache clear empties this one)")
        return CacheError(f"cache folder {self.root}: cannot write {where} ({e.strerror})",
                          hint="check the folder's permissions, or pass --cache-dir with another folder")

    # ------------------------------------------------------------------ entries
    def get(self, stage: str, key: str) -> Path | None:
        """The entry folder when present and intact; a damaged entry (a file where a folder
        belongs, unreadable or altered files) is dropped with a warning and rebuilt."""
        if not self.enabled:
            return None
        d = self.path(stage, key)
        try:
            if not os.path.lexists(d):
                return None
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                raise ValueError("not a folder")
            if not is_regular(d / ENTRY):
                raise ValueError(f"{ENTRY} missing or not a regular file")
            meta = json.loads((d / ENTRY).read_text())
            if not isinstance(meta, dict) or meta.get("files") != _checksums(d):
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            _warn(f"cache entry {stage}/{key} is damaged ({getattr(e, 'strerror', None) or e}); dropping it and rebuilding")
            self._drop(d)
            return None
        try:
            os.utime(d / ENTRY)  # last use, for 'cache ls'
        except OSError:
            pass
        return d

    def _drop(self, d: Path) -> None:
        """Remove a damaged entry (or a file where a folder belongs) so it can be rebuilt."""
        try:
            if os.path.isdir(d) and not os.path.islink(d):
                trash = d.with_name(f".tmp-{os.getpid()}-drop-{d.name}")
                os.replace(d, trash)  # gone from its place at once, even if deleting fails
                shutil.rmtree(trash, ignore_errors=True)
            elif os.path.lexists(d):
                os.unlink(d)
        except OSError as e:
            raise CacheError(f"cache entry {d} is damaged and cannot be removed ({e.strerror})",
                             hint=f"remove it by hand, or run 'edgebuild cache clear --cache-dir {self.root}'") from None

    def put(self, stage: str, key: str, describe: dict, build: Callable[[Path], Any]) -> tuple[Path, Any]:
        """Run ``build(tmpdir)``; on success move tmpdir to the entry atomically. The entry is
        locked meanwhile: a second build of the same entry waits and then reuses it."""
        self.check_identity(create=True)
        stage_dir = self.root / stage
        try:
            if os.path.lexists(stage_dir) and not os.path.isdir(stage_dir):
                _warn(f"cache: {stage_dir} is not a folder; replacing it")
                self._drop(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._os_error(e, stage_dir) from None
        sweep_stale(stage_dir, ".tmp-")
        with FileLock(stage_dir / f".{key}.lock", f"cache entry {stage}/{key}", wait=self.wait, log=self.log):
            if self.enabled:
                hit = self.get(stage, key)
                if hit is not None:  # another build wrote it while this one waited
                    return hit, None
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{key}-", dir=stage_dir))
            except OSError as e:
                raise self._os_error(e, stage_dir) from None
            try:
                t0 = time.perf_counter()
                result = build(tmp)
                entry = {"stage": stage, "key": key, "created": time.time(), "seconds": round(time.perf_counter() - t0, 3),
                         "describe": describe, "files": _checksums(tmp)}
                (tmp / ENTRY).write_text(json.dumps(entry, indent=2, default=str))
                final = self.path(stage, key)
                if os.path.lexists(final):
                    self._drop(final)
                os.replace(tmp, final)
                return final, result
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if e.errno in _DISK_FULL:
                    raise self._os_error(e, Path(e.filename) if e.filename else tmp) from None
                raise
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, Exception) and not isinstance(e, EdgebuildError) and (_full_in(e) or _disk_full(stage_dir)):
                    # a library wrapped the write error (torch: "PytorchStreamWriter failed writing file",
                    # safetensors: "I/O error: File too large (os error 27)")
                    raise CacheError(f"cache folder {self.root}: the disk is full while writing a {stage} entry ({type(e).__name__})",
                                     hint="free space, or pass --cache-dir on another disk (edgebuild cache clear empties this one)") from e
                raise

    def entries(self) -> list[dict]:
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()):
            for d in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")):
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
                try:
                    mtime = (d / ENTRY).stat().st_mtime
                except OSError:
                    mtime = d.stat().st_mtime
                try:
                    desc = json.loads((d / ENTRY).read_text()).get("describe") or {}
                except (OSError, ValueError):
                    desc = {}
                out.append({"stage": stage_dir.name, "key": d.name, "bytes": size, "last_used": mtime,
                            "build": desc.get("name"), "target": desc.get("target")})
        return out

    def prune(self, older_than: float) -> tuple[int, int]:
        """Remove entries last used (built or read) more than ``older_than`` seconds ago;
        returns (entries removed, bytes freed)."""
        cutoff = time.time() - older_than
        n = freed = 0
        for e in self.entries():
            if e["last_used"] < cutoff:
                shutil.rmtree(self.path(e["stage"], e["key"]), ignore_errors=True)
                n, freed = n + 1, freed + e["bytes"]
        return n, freed

    def clear(self) -> int:
        """Remove every entry of this cache; a folder that is not an edgebuild cache is refused."""
        if not os.path.lexists(self.root):
            return 0
        if not self.is_cache():
            if self._legacy():
                self.check_identity(create=True)
            else:
                raise CacheError(f"{self.root} is not an edgebuild cache (no {MARKER}); nothing was removed",
                                 hint="check --cache-dir / EDGEBUILD_CACHE_DIR: clear only empties folders edgebuild made")
        n = len(self.entries())
        for stage_dir in self.root.iterdir():
            if stage_dir.is_dir() and not stage_dir.is_symlink():
                shutil.rmtree(stage_dir, ignore_errors=True)
        return n


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _full_in(e: BaseException) -> bool:
    """A disk-full error somewhere in ``e``'s chain, or named in a library's message."""
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        text = str(e)
        m = re.search(r"(?:os error|errno)\s*(\d+)", text, re.I)
        if (m and int(m.group(1)) in _FULL) or any(os.strerror(n) in text for n in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin
