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
from typing import Optional

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
    pp = cfg.preprocess
    rebuilt: set[str] = set()

    def array(name: str, split: ImageFolder) -> store_mod.ImageArray:
        key = store_mod.store_key(fps[name], pp.input_size, pp.color, pp.resize)

        def opener() -> store_mod.ImageStore:
            again = rebuild and key not in rebuilt
            rebuilt.add(key)
            return store_mod.open_or_build(root, key, split, pp.input_size, pp.color, pp.resize, d.workers, again, progress,
                                           label=f"decoding {name} images")
        def existing() -> store_mod.ImageStore | None:
            return None if rebuild and key not in rebuilt else store_mod.open_existing(root, key)
        return store_mod.ImageArray(split, opener, pp.input_size, pp.color, pp.resize, pp.mean, pp.std, existing=existing)

    return Data(src.classes, src.train, src.val, src.test, fp, src.record, array("train", src.train), array("val", src.val),
                array("test", src.test) if src.test is not None else None, fps)
