"""A build's data: its splits, their fingerprint, and their images as lazily opened stores.

``prepare`` reads the sources and fingerprints them (file contents, memoised by size, mtime and
inode, so a rebuild does not re-read every image); no image is decoded and torch is not
imported. The first access to pixels opens, or builds, the split's store (store.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import store as store_mod
from .cache import sha256_file
from .config import BuildConfig
from .data import ImageFolder, fingerprint_folder
from .sources import resolve


@dataclass
class Data:
    classes: list[str]
    train: ImageFolder
    val: ImageFolder
    test: Optional[ImageFolder]
    fingerprint: str
    record: dict  # what the manifest records about the data (sources, val_split)
    Xtrain: store_mod.ImageArray
    Xval: store_mod.ImageArray
    Xtest: Optional[store_mod.ImageArray] = None
    split_fingerprints: dict = field(default_factory=dict)
    resized: Optional[Callable[[tuple], "Data"]] = field(default=None, repr=False, compare=False)

    def at(self, input_size) -> "Data":
        """The same splits preprocessed at another input size: decoded from the images into that
        size's own store, the same way (the store is keyed by the preprocessing)."""
        size = (int(input_size[0]), int(input_size[1]))
        if size == self.Xval.size:
            return self
        if self.resized is None:
            raise ValueError("these splits were not made by dataset.prepare: no other input size")
        return self.resized(size)

    @property
    def ytrain(self) -> np.ndarray:
        return np.asarray(self.train.targets, dtype=np.int64)

    @property
    def yval(self) -> np.ndarray:
        return np.asarray(self.val.targets, dtype=np.int64)

    @property
    def ytest(self) -> Optional[np.ndarray]:
        return np.asarray(self.test.targets, dtype=np.int64) if self.test is not None else None

    @property
    def val_files(self) -> list[Path]:
        return self.val.files

    @property
    def train_counts(self) -> dict:
        return self.train.class_counts()

    @property
    def val_counts(self) -> dict:
        return self.val.class_counts()


class DigestMemo:
    """sha256 of files, memoised on (size, mtime_ns, inode) in CACHE/data/digests.json."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.memo = json.loads(path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.changed = False

    def __call__(self, f: Path) -> str:
        st = os.stat(f)
        key = os.path.abspath(f)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.memo.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        digest = sha256_file(f)
        self.memo[key] = stamp + [digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.memo))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs re-hashing next time


def prepare(cfg: BuildConfig, cache_root: Path, progress=None, rebuild: bool = False) -> Data:
    """The splits named in the build file, fingerprinted; images decoded on first use."""
    d = cfg.data
    src = resolve(cfg.resolve(d.train), cfg.resolve(d.val) if d.val else None, cfg.resolve(d.test) if d.test else None,
                  d.val_split, cfg.seed)
    root = Path(cache_root) / "data"
    memo = DigestMemo(root / "digests.json")
    fps = {name: fingerprint_folder(s, memo) for name, s in (("train", src.train), ("val", src.val), ("test", src.test)) if s is not None}
    memo.save()
    code = store_mod.code_sha256()
    fp = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in fps.items()).encode() + f"preprocess:{code}\n".encode()).hexdigest()
    rebuilt: set[str] = set()

    def array(name: str, split: ImageFolder, pp) -> store_mod.ImageArray:
        key = store_mod.store_key(fps[name], pp.input_size, pp.color, pp.resize)

        def opener() -> store_mod.ImageStore:
            again = rebuild and key not in rebuilt
            rebuilt.add(key)
            return store_mod.open_or_build(root, key, split, pp.input_size, pp.color, pp.resize, d.workers, again, progress,
                                           label=f"decoding {name} images" + (f" at {pp.input_size[0]}x{pp.input_size[1]}" if tuple(pp.input_size) != tuple(cfg.preprocess.input_size) else ""))
        def existing() -> store_mod.ImageStore | None:
            return None if rebuild and key not in rebuilt else store_mod.open_existing(root, key)
        return store_mod.ImageArray(split, opener, pp.input_size, pp.color, pp.resize, pp.mean, pp.std, existing=existing)

    sizes: dict[tuple, Data] = {}

    def at(size: tuple) -> Data:
        if size not in sizes:
            pp = cfg.preprocess.model_copy(update={"input_size": size})
            sizes[size] = Data(src.classes, src.train, src.val, src.test, fp, src.record, array("train", src.train, pp), array("val", src.val, pp),
                               array("test", src.test, pp) if src.test is not None else None, fps, resized=at)
        return sizes[size]

    return at(tuple(int(s) for s in cfg.preprocess.input_size))
