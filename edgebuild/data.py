"""Image-folder datasets, the one preprocessing function, calibration subsets, fingerprints."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .cache import sha256_file  # noqa: F401 - re-exported: one file hash for the project
from .config import PreprocessConfig
from .errors import DataError
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
    path = Path(path)
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with a clear error
            img = Image.open(path)
        with img:
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise DataError(
                    f"{path}: image is {img.size[0]}x{img.size[1]} pixels, over the limit of {MAX_PIXELS}",
                    hint="downscale the image before adding it to the dataset",
                )
            img.load()
            return preprocess_image(img, cfg)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read", hint="remove the file or replace it with a valid image") from None
    except Image.DecompressionBombError as e:
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        claimed = f"{int(m.group(1))} pixels" if m else "too many pixels"
        raise DataError(
            f"{path}: refused: the image claims {claimed}, over the limit of {MAX_PIXELS} (a decompression bomb?)",
            hint="downscale the image before adding it to the dataset, or remove it",
        ) from None
    except (OSError, SyntaxError, ValueError, MemoryError, EOFError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({e})", hint="remove the file or re-export it") from None


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


def _check_label(name: str, root: Path) -> None:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise DataError(f"{root}: class folder name {name!r} contains control characters", hint="rename the folder; labels are written one per line")
    if name != name.strip():
        raise DataError(f"{root}: class folder name {name!r} has leading or trailing spaces", hint="rename the folder")


def _check_regular(p: Path) -> None:
    """Refuse what cannot be read as an image file: broken links, link loops, fifos, devices.

    (A fifo would block the build forever; a broken link is a file that is not there.)"""
    import errno
    import stat

    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{p}: symbolic link loop", hint="remove the symbolic link or point it at an image") from None
        if os.path.islink(p):
            raise DataError(f"{p}: broken symbolic link (points to {os.readlink(p)!r}, which does not exist)",
                            hint="remove the link or restore the file it points to") from None
        raise DataError(f"{p}: cannot read ({e.strerror})", hint="check the file and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device or special file"
        raise DataError(f"{p}: not a regular file (a {kind})", hint="class folders may hold image files only; remove it")


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
    files: list[Path] = []
    targets: list[int] = []
    for idx, cls in enumerate(classes):
        _check_label(cls, root)
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
            parts.append(f"only in train: {', '.join(only_train)}")
        if only_val:
            parts.append(f"only in val: {', '.join(only_val)}")
        raise DataError(
            f"train and val have different classes ({'; '.join(parts)})",
            hint="give train and val the same class sub-folders",
        )


def load_arrays(folder: ImageFolder, cfg: PreprocessConfig, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    xs = []
    for i, f in enumerate(folder.files):
        xs.append(load_image(f, cfg))
        if progress:
            progress(i + 1)
    return np.stack(xs).astype(np.float32), np.asarray(folder.targets, dtype=np.int64)


def fingerprint_folder(folder: ImageFolder) -> str:
    """sha256 over (relative path, content) of every image, in order."""
    h = hashlib.sha256()
    for f in folder.files:
        h.update(str(f.relative_to(folder.root)).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(sha256_file(f).encode())
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
