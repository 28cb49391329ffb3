"""Content-addressed store of stage outputs with atomic writes.

An entry is ``ROOT/STAGE/KEY/`` holding the stage's files plus ``entry.json`` (the key's
inputs and the sha256 of every file). Entries are built in a temporary folder and renamed
into place, so a crash leaves either a whole entry or none; an entry whose checksums do not
match is dropped with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

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
        if p.is_file() and p.name != ENTRY:
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


class Cache:
    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root else default_root()
        self.enabled = enabled

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Path | None:
        """The entry folder when present and intact; a corrupt entry is dropped with a warning."""
        if not self.enabled:
            return None
        d = self.path(stage, key)
        if not d.is_dir():
            return None
        try:
            meta = json.loads((d / ENTRY).read_text())
            if meta.get("files") != _checksums(d):
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            warnings.warn(f"cache entry {stage}/{key} is corrupt ({e}); dropping it and rebuilding", stacklevel=2)
            shutil.rmtree(d, ignore_errors=True)
            return None
        try:
            os.utime(d / ENTRY)  # last use, for 'cache ls'
        except OSError:
            pass
        return d

    def put(self, stage: str, key: str, describe: dict, build: Callable[[Path], Any]) -> tuple[Path, Any]:
        """Run ``build(tmpdir)``; on success move tmpdir to the entry atomically."""
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        sweep_stale(self.root / stage, ".tmp-")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{key}-", dir=self.root / stage))
        try:
            t0 = time.perf_counter()
            result = build(tmp)
            entry = {"stage": stage, "key": key, "created": time.time(), "seconds": round(time.perf_counter() - t0, 3),
                     "describe": describe, "files": _checksums(tmp)}
            (tmp / ENTRY).write_text(json.dumps(entry, indent=2, default=str))
            final = self.path(stage, key)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            return final, result
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def entries(self) -> list[dict]:
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for d in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")):
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                try:
                    mtime = (d / ENTRY).stat().st_mtime
                except OSError:
                    mtime = d.stat().st_mtime
                out.append({"stage": stage_dir.name, "key": d.name, "bytes": size, "last_used": mtime})
        return out

    def clear(self) -> int:
        n = len(self.entries())
        if self.root.is_dir():
            for stage_dir in self.root.iterdir():
                if stage_dir.is_dir():
                    shutil.rmtree(stage_dir, ignore_errors=True)
        return n
