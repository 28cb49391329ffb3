"""The decoded-image store: every image decoded once, in parallel, into uint8 on disk.

A split (train, val or test) is decoded by worker processes into ``images.npy`` (uint8,
N x H x W x C: after mode conversion and resize, before any float arithmetic) under
``CACHE/data/KEY/``, KEY being the sha256 of the split's fingerprint, the decode parameters
and the code of preprocess.py. The entry is built in a temporary folder and renamed into
place under a lock, so a crash leaves a whole entry or none, and builds (and torchrun's ranks)
share it. Batches are read with positioned reads and normalised per batch
(preprocess.normalize): the build's memory does not grow with the number of images, and the
floats are bit-identical to preprocess.preprocess on each file.

Numpy and Pillow only (no torch): opening a store is cheap and the plan never decodes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .data import ImageFolder, decode_file
from .errors import DataError
from .preprocess import normalize

POOL_MIN_IMAGES = 256  # fewer images decode in the build's own process (a pool costs more to start)
CHUNK = 32  # images per task sent to a worker
MAX_WORKERS = 8


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def code_sha256() -> str:
    return hashlib.sha256((Path(__file__).resolve().parent / "preprocess.py").read_bytes()).hexdigest()


def store_key(fingerprint: str, input_size, color: str, resize: str) -> str:
    mode = "L" if color == "grayscale" else "RGB"  # bgr is RGB on disk, reordered per batch
    blob = json.dumps({"v": 1, "images": fingerprint, "size": [int(s) for s in input_size], "mode": mode, "resize": resize,
                       "code": code_sha256()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ImageStore:
    """An open store: ``rows(idx)`` gives uint8 images by positioned reads (no mapping, so the
    file's pages never count towards this process's memory)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "images.npy"
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            self.offset = f.tell()
        if dtype != np.uint8 or len(shape) != 4:
            raise DataError(f"{self.path}: not an image store", hint="run 'edgebuild cache clear' and build again")
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape[1:]))
        if os.path.getsize(self.path) != self.offset + self.row_bytes * self.shape[0]:
            raise DataError(f"{self.path}: truncated image store", hint="run 'edgebuild cache clear' and build again")
        self._fd: Optional[int] = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx),) + self.shape[1:], np.uint8)
        if not len(idx):
            return out
        flat = out.reshape(len(idx), -1)
        fd = self._file()
        k = 0
        while k < len(idx):  # a run of consecutive rows is one read
            j = k + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            want = (j - k) * self.row_bytes
            buf = os.pread(fd, want, self.offset + int(idx[k]) * self.row_bytes)
            if len(buf) != want:
                raise DataError(f"{self.path}: short read", hint="run 'edgebuild cache clear' and build again")
            flat[k:j] = np.frombuffer(buf, np.uint8).reshape(j - k, -1)
            k = j
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Building a store
# ----------------------------------------------------------------------------------------------


def _decode_into(path: str, offset: int, row_bytes: int, items: list[tuple[int, str]], size, color: str, resize: str):
    """Worker: decode ``items`` ((row, file)) and write each row at its place. Returns the count,
    or (row, message, hint) for the first file that is not a readable image."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for row, f in items:
            try:
                arr = decode_file(f, size, color, resize)
            except DataError as e:
                return (row, e.message, e.hint)
            os.pwrite(fd, np.ascontiguousarray(arr).tobytes(), offset + row * row_bytes)
    finally:
        os.close(fd)
    return len(items)


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _where(split: ImageFolder, row: int) -> str:
    lines = getattr(split, "lines", None)
    return f"{split.root}:{lines[row]}: " if lines else ""


def build(split: ImageFolder, dest: Path, size, color: str, resize: str, workers: int = 0,
          progress: Optional[Callable[[int, str], None]] = None) -> Path:
    """Decode every image of ``split`` into a store at ``dest`` (atomically)."""
    h, w = int(size[0]), int(size[1])
    shape = (len(split.files), h, w, 1 if color == "grayscale" else 3)
    row_bytes = h * w * shape[3]
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{dest.name}-", dir=dest.parent))
    try:
        path = tmp / "images.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            offset = f.tell()
            f.truncate(offset + row_bytes * shape[0])
        workers = workers or default_workers()
        files = [str(p) for p in split.files]
        items = list(enumerate(files))
        chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
        t0 = time.perf_counter()
        done = 0

        def account(res):
            nonlocal done
            if isinstance(res, tuple):
                row, msg, hint = res
                raise DataError(f"{_where(split, row)}{msg}", hint=hint)
            done += res
            if progress:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                eta = (len(files) - done) / rate if rate > 0 else 0.0
                progress(done, f"{rate:.0f} images/s, ETA {eta:.0f}s")

        if workers <= 1 or len(files) < POOL_MIN_IMAGES:
            for c in chunks:
                account(_decode_into(str(path), offset, row_bytes, c, (h, w), color, resize))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
                pending = set()
                it = iter(chunks)
                try:
                    for c in it:  # a bounded queue: at most 4 tasks per worker in flight
                        pending.add(pool.submit(_decode_into, str(path), offset, row_bytes, c, (h, w), color, resize))
                        if len(pending) >= 4 * workers:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for fut in finished:
                                account(fut.result())
                    for fut in pending:
                        account(fut.result())
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
        seconds = time.perf_counter() - t0
        entry = {"stage": "data", "key": dest.name, "created": time.time(), "shape": list(shape),
                 "describe": {"name": str(split.root), "target": "", "images": len(files), "decode_seconds": seconds,
                              "images_per_second": len(files) / seconds if seconds > 0 else None, "workers": workers}}
        (tmp / "store.json").write_text(json.dumps(entry, indent=2))
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep(folder: Path) -> None:
    from .cache import sweep_stale

    sweep_stale(folder, ".tmp-")


def open_existing(root: Path, key: str) -> Optional[ImageStore]:
    """The store for ``key`` when it is there and whole, else None (never builds)."""
    dest = Path(root) / key
    if not (dest / "store.json").is_file():
        return None
    try:
        return ImageStore(dest)
    except (DataError, OSError, ValueError):
        return None


def open_or_build(root: Path, key: str, split: ImageFolder, size, color: str, resize: str, workers: int = 0,
                  rebuild: bool = False, progress=None, label: str = "decoding images") -> ImageStore:
    """The store for ``key`` under ``root``: opened when there, else built (once, under a lock)."""
    dest = Path(root) / key
    with _locked(Path(root) / f".{key}.lock"):
        if rebuild and dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        if (dest / "store.json").is_file():
            try:
                return ImageStore(dest)
            except DataError:
                shutil.rmtree(dest, ignore_errors=True)  # a damaged entry is rebuilt
        if progress is not None:
            with progress.task(f"{label} ({len(split.files)} images)", len(split.files)) as t:
                build(split, dest, size, color, resize, workers, lambda n, info: t.update(n, info))
        else:
            build(split, dest, size, color, resize, workers)
        return ImageStore(dest)


class ImageArray:
    """A split's images as model inputs (float32 N x C x H x W), read and normalised per batch.

    Indexing (an int, a slice or an index array) returns a numpy array; nothing else is held
    in memory. The store is opened (or built) on the first access; while there is none, the
    first few images asked for (``direct_max`` in all) are decoded directly (the same function,
    the same floats), so a fully cached build decodes only the few images it needs."""

    dtype = np.float32

    def __init__(self, split: ImageFolder, opener: Callable[[], ImageStore], size, color: str, resize: str, mean, std,
                 direct_max: int = 64, existing: Optional[Callable[[], Optional[ImageStore]]] = None):
        self.split = split
        self._opener = opener
        self._existing = existing
        self._store: Optional[ImageStore] = None
        self.size = (int(size[0]), int(size[1]))
        self.color, self.resize, self.mean, self.std = color, resize, list(mean), list(std)
        self.channels = 1 if color == "grayscale" else 3
        self.direct_left = direct_max  # images decoded directly, in all, before the store is built

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.split.files), self.channels, *self.size)

    def __len__(self) -> int:
        return len(self.split.files)

    def store(self) -> ImageStore:
        if self._store is None:
            self._store = self._opener()
        return self._store

    def uint8(self, idx) -> np.ndarray:
        """uint8 N x H x W x C rows (the stored bytes)."""
        idx = self._indices(idx)
        if self._store is None and self._existing is not None:
            self._store = self._existing()
        if self._store is None and len(idx) <= self.direct_left:
            self.direct_left -= len(idx)
            if not len(idx):
                return np.zeros((0, *self.size, self.channels), np.uint8)
            return np.stack([decode_file(self.split.files[i], self.size, self.color, self.resize) for i in idx])
        return self.store().rows(idx)

    def _indices(self, idx) -> np.ndarray:
        n = len(self)
        if isinstance(idx, slice):
            return np.arange(n)[idx]
        arr = np.asarray(idx)
        if arr.dtype == bool:
            arr = np.flatnonzero(arr)
        arr = arr.astype(np.int64).reshape(-1)
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return np.where(arr < 0, arr + n, arr)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[np.asarray([idx])][0]
        return normalize(self.uint8(idx), self.color, self.mean, self.std)

    def __array__(self, dtype=None, copy=None):  # np.asarray(X): the whole split (small splits, tests)
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def batches(self, batch_size: int):
        for b in range(0, len(self), batch_size):
            yield self[b : b + batch_size]
