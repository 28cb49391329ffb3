"""Image folders, decoding an image file (with every refusal), calibration subsets, fingerprints.

List files (.csv / .jsonl) and val_split: sources.py. The decoded-image store: store.py."""

from __future__ import annotations

import hashlib
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .cache import sha256_file  # noqa: F401 - re-exported: one file hash for the project
from .config import PreprocessConfig
from .errors import DataError
from .files import check_path
from .preprocess import FORMATS, open_image
from .preprocess import decode as _decode
from .preprocess import normalize as _normalize
from .preprocess import preprocess as _preprocess

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MAX_PIXELS = 50_000_000  # refuse decompression bombs clearly instead of Pillow's warning


def preprocess_args(cfg: PreprocessConfig) -> dict:
    """The preprocessing parameters as plain data (what the manifest and stubs carry)."""
    return {
        "input_size": [int(cfg.input_size[0]), int(cfg.input_size[1])],
        "color": cfg.color,
        "resize": cfg.resize,
        "mean": [float(m) for m in cfg.mean],
        "std": [float(s) for s in cfg.std],
        "layout": "NCHW",
        "dtype": "float32",
    }


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The one preprocessing function (see edgebuild/preprocess.py, copied into every stub)."""
    return _preprocess(img, cfg.input_size, cfg.color, cfg.resize, cfg.mean, cfg.std)


def load_image(path: str | os.PathLike, cfg: PreprocessConfig) -> np.ndarray:
    """One image file -> the model input (float32 C, H, W)."""
    return _normalize(decode_file(path, cfg.input_size, cfg.color, cfg.resize), cfg.color, cfg.mean, cfg.std)


def decode_file(path: str | os.PathLike, input_size, color: str, resize: str) -> np.ndarray:
    """One image file -> uint8 (H, W, C) after mode conversion and resize; DataError naming
    the file for anything that is not a readable image."""
    path = Path(path)
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with a clear error
            img = open_image(path)  # only FORMATS, decoded in-process
        with img:
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise DataError(
                    f"{path}: image is {img.size[0]}x{img.size[1]} pixels, over the limit of {MAX_PIXELS}",
                    hint="downscale the image before adding it to the dataset",
                )
            img.load()
            return _decode(img, input_size, color, resize)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image in a format edgebuild decodes (allowed: {', '.join(FORMATS)})",
                        hint="convert the image to PNG or JPEG, or remove it") from None
    except Image.DecompressionBombError as e:
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        claimed = f"{int(m.group(1))} pixels" if m else "too many pixels"
        raise DataError(
            f"{path}: refused: the image claims {claimed}, over the limit of {MAX_PIXELS} (a decompression bomb?)",
            hint="downscale the image before adding it to the dataset, or remove it",
        ) from None
    except (Exception, MemoryError) as e:  # noqa: BLE001 - a decoder's failure on untrusted bytes is bad input
        raise DataError(f"{path}: corrupt or unreadable image ({' '.join(str(e).split())[:200] or type(e).__name__})",
                        hint="remove the file or re-export it") from None


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    files: list[Path]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for t in self.targets:
            counts[self.classes[t]] += 1
        return counts


def shown(name: str) -> str:
    """A label as it can be told apart from look-alikes: plain when ASCII, else with escapes."""
    return name if name.isascii() and name.isprintable() else ascii(name)


def _check_label(name: str, root: Path) -> None:
    """Labels are written one per line (labels.txt) and read back with str.splitlines(), which
    also splits on U+0085, U+2028, U+2029, \\x1c-\\x1e, \\v and \\f: refuse every one of them,
    every other control character and undecodable bytes (lone surrogates)."""
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or len(("a" + ch + "a").splitlines()) > 1 for ch in name):
        raise DataError(f"{root}: class folder name {ascii(name)} contains control characters, line separators or undecodable bytes",
                        hint="rename the folder; labels are written one per line")
    if name != name.strip():
        raise DataError(f"{root}: class folder name {name!r} has leading or trailing spaces", hint="rename the folder")


def _check_lookalikes(classes: list[str], root: Path) -> None:
    """Two class folders whose names are equal after Unicode normalisation (NFKC: 'é' as one
    code point or as e + a combining accent, 'ﬁ' and 'fi') would print as the same label."""
    seen: dict[str, str] = {}
    for c in classes:
        key = unicodedata.normalize("NFKC", c)
        if key in seen:
            raise DataError(f"{root}: class folders {shown(seen[key])} and {shown(c)} are the same name after Unicode normalisation",
                            hint="rename one of them; labels must be told apart when printed")
        seen[key] = c


def _check_regular(p: Path) -> None:
    """Refuse what cannot be read as an image file: broken links, link loops, fifos, devices
    (a fifo would block the build forever; a broken link is a file that is not there)."""
    check_path(p, "image file", DataError, hint="class folders may hold image files only; remove it")


def scan_folder(root: Path, what: str) -> ImageFolder:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} folder not found: {root}", hint="fix 'data.%s' in the build file (relative paths resolve against it)" % what)
    if not root.is_dir():
        raise DataError(f"{what} path is not a folder: {root}", hint="point it at a folder with one sub-folder per class")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{root}: cannot list folder ({e.strerror})", hint="check permissions") from None
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        raise DataError(f"{root}: no class sub-folders", hint="put the images in one sub-folder per class; folder names are the labels")
    for cls in classes:
        _check_label(cls, root)
    _check_lookalikes(classes, root)
    files: list[Path] = []
    targets: list[int] = []
    for idx, cls in enumerate(classes):
        cdir = root / cls
        found = []
        seen_dirs = set()
        def walk_error(e: OSError) -> None:
            raise DataError(f"{e.filename}: cannot list folder ({e.strerror})", hint="check the folder and its permissions")

        for dirpath, dirnames, filenames in os.walk(cdir, onerror=walk_error, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:
                raise DataError(f"{dirpath}: symlink loop (this folder is reached twice)", hint="remove the symbolic link that points back into the dataset")
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                p = Path(dirpath) / fn
                _check_regular(p)
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(
                        f"{p}: not an image file (extension '{p.suffix}')",
                        hint=f"keep only images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class folders",
                    )
                found.append(p)
        if not found:
            raise DataError(f"{cdir}: class '{cls}' has no images", hint="add images or remove the empty folder")
        files.extend(found)
        targets.extend([idx] * len(found))
    return ImageFolder(root=root, classes=classes, files=files, targets=targets)


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    if len(train.classes) < 2:
        raise DataError(f"{train.root}: only one class ({train.classes[0]!r}); a classifier needs at least two",
                        hint="add a sub-folder of images for every class the model must tell apart")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = []
        if only_train:
            parts.append(f"only in train: {', '.join(map(shown, only_train))}")
        if only_val:
            parts.append(f"only in val: {', '.join(map(shown, only_val))}")
        norm = {unicodedata.normalize("NFKC", c) for c in only_train} & {unicodedata.normalize("NFKC", c) for c in only_val}
        if norm:
            parts.append("names that differ only in Unicode normalisation are different classes")
        raise DataError(
            f"train and val have different classes ({'; '.join(parts)})",
            hint="give train and val the same class sub-folders",
        )


def fingerprint_folder(folder: ImageFolder, digest: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over (path relative to the folder or list file, label, content) of every image, in order."""
    base = folder.root if folder.root.is_dir() else folder.root.parent
    h = hashlib.sha256()
    for f, t in zip(folder.files, folder.targets):
        h.update(os.path.relpath(f, base).encode("utf-8", "surrogateescape"))
        h.update(b"\0" + folder.classes[t].encode("utf-8", "surrogateescape") + b"\0")
        h.update(digest(f).encode())
    return h.hexdigest()


def calibration_indices(targets: Sequence[int], n: int, seed: int) -> np.ndarray:
    """A seeded, class-balanced subset of at most ``n`` indices (round-robin over classes)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(targets == c)).tolist() for c in np.unique(targets)]
    out: list[int] = []
    while len(out) < min(n, len(targets)):
        for lst in per_class:
            if lst and len(out) < n:
                out.append(lst.pop())
    if len(out) < 100:
        warnings.warn(f"calibration set has only {len(out)} samples (fewer than ~100 may calibrate int8 poorly)", stacklevel=2)
    return np.asarray(sorted(out), dtype=np.int64)
