"""Where the images come from: an image folder or a list file, and the val split.

``data.train`` / ``data.val`` / ``data.test`` each name a folder with one sub-folder per class
(data.scan_folder) or a list file: ``.csv`` with the header ``path,label`` or ``.jsonl`` with
one ``{"path": ..., "label": ...}`` object per line. Paths in a list resolve against the list
file's folder. ``data.val_split`` holds out a seeded, stratified fraction of train as val.
Every problem is a DataError naming the file and the line.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import IMAGE_EXTENSIONS, ImageFolder, _check_label, _check_lookalikes, _check_regular, check_same_classes, scan_folder
from .errors import DataError
from .loaders import loads_json

LIST_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Sources:
    """The resolved splits (train classes index every split's targets) and what the manifest records."""

    classes: list[str]
    train: ImageFolder
    val: ImageFolder
    test: ImageFolder | None
    record: dict = field(default_factory=dict)


def read_split(path: Path, what: str) -> ImageFolder:
    """A folder or a list file; for a list, ``classes`` are its sorted labels."""
    path = Path(path)
    if path.suffix.lower() in LIST_SUFFIXES and not path.is_dir():
        return read_list(path, what)
    if path.is_file():
        raise DataError(f"{what}: {path} is a file but not a list file ({', '.join(LIST_SUFFIXES)})",
                        hint="point it at a folder with one sub-folder per class, or a .csv (path,label) or .jsonl list")
    return scan_folder(path, what)


def _rows(path: Path):
    """(line number, path text, label text) per row; malformed rows raise, naming the line."""
    text_hint = "see README 'Data sources' for the list format"
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})", hint="check the file and its permissions") from None
    with f:
        try:
            if path.suffix.lower() == ".csv":
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or [h.strip().lower() for h in header] != ["path", "label"]:
                    raise DataError(f"{path}:1: expected the header row 'path,label', got {','.join(header or [])!r}",
                                    hint="the first line of a .csv list is: path,label")
                for row in reader:
                    line = reader.line_num
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != 2:
                        raise DataError(f"{path}:{line}: expected 2 fields (path,label), got {len(row)}", hint=text_hint)
                    yield line, row[0].strip(), row[1].strip()
            else:
                for line, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        obj = loads_json(raw)  # duplicate keys, NaN and oversized integers refused
                    except (ValueError, RecursionError) as e:
                        raise DataError(f"{path}:{line}: not a JSON object ({e})", hint=text_hint) from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not isinstance(obj.get("label"), (str, int)) \
                            or isinstance(obj.get("label"), bool):
                        raise DataError(f"{path}:{line}: expected {{\"path\": \"...\", \"label\": \"...\"}}, got {raw.strip()[:80]}", hint=text_hint)
                    yield line, obj["path"].strip(), str(obj["label"]).strip()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})", hint="save the list as UTF-8") from None
        except csv.Error as e:  # a NUL byte, a field over the size limit, a broken quote
            raise DataError(f"{path}:{reader.line_num}: not a readable CSV row ({e})", hint=text_hint) from None


def read_list(path: Path, what: str) -> ImageFolder:
    if not path.exists():
        raise DataError(f"{what} list not found: {path}", hint=f"fix 'data.{what}' in the build file (relative paths resolve against it)")
    _check_regular(path)
    base = path.parent
    files: list[Path] = []
    labels: list[str] = []
    lines: list[int] = []
    for line, p, label in _rows(path):
        where = f"{path}:{line}"
        if not p:
            raise DataError(f"{where}: empty path", hint="every row needs an image path")
        if not label:
            raise DataError(f"{where}: empty label", hint="every row needs a label")
        try:
            _check_label(label, path)
        except DataError as e:
            raise DataError(f"{where}: label {label!r} contains control characters or surrounding spaces", hint=e.hint) from None
        f = base / os.path.expanduser(p)
        if not f.exists() and not f.is_symlink():
            raise DataError(f"{where}: image not found: {f}", hint="paths in a list file are relative to the list file's folder")
        try:
            _check_regular(f)
        except DataError as e:
            raise DataError(f"{where}: {e.message}", hint=e.hint) from None
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{where}: not an image file (extension '{f.suffix}')", hint=f"list images only ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files.append(f)
        labels.append(label)
        lines.append(line)
    if not files:
        raise DataError(f"{path}: the list has no rows", hint="add one row per image")
    classes = sorted(set(labels))
    _check_lookalikes(classes, path)
    index = {c: i for i, c in enumerate(classes)}
    folder = ImageFolder(root=path, classes=classes, files=files, targets=[index[x] for x in labels])
    folder.lines = lines  # type: ignore[attr-defined]
    return folder


def relabel(split: ImageFolder, classes: list[str], what: str) -> ImageFolder:
    """``split`` with targets indexing ``classes`` (train's); a label train does not have is refused."""
    index = {c: i for i, c in enumerate(classes)}
    targets = []
    lines = getattr(split, "lines", None)
    for k, t in enumerate(split.targets):
        label = split.classes[t]
        if label not in index:
            where = f"{split.root}:{lines[k]}" if lines else str(split.files[k])
            raise DataError(f"{where}: unknown label {label!r} in {what} (train has: {', '.join(classes)})",
                            hint=f"every {what} label must be one of train's classes")
        targets.append(index[label])
    return ImageFolder(root=split.root, classes=list(classes), files=split.files, targets=targets)


def stratified_split(targets, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (train indices, val indices): round(fraction * n) of every class,
    at least 1, leaving at least 1 in train."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val.extend(idx[:k].tolist())
    val_idx = np.asarray(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(targets)), val_idx)
    return train_idx, val_idx


def _subset(folder: ImageFolder, idx: np.ndarray) -> ImageFolder:
    return ImageFolder(root=folder.root, classes=folder.classes, files=[folder.files[i] for i in idx], targets=[folder.targets[i] for i in idx])


def resolve(train_path: Path, val_path: Path | None, test_path: Path | None, val_split: float | None, seed: int) -> Sources:
    """Read the splits named in the build file, hold out val when asked, check the labels."""
    train = read_split(train_path, "train")
    record: dict = {"train": str(train_path), "val": str(val_path) if val_path else None, "test": str(test_path) if test_path else None}
    if val_path is None:
        counts = np.bincount(np.asarray(train.targets), minlength=len(train.classes))
        for c, n in zip(train.classes, counts):
            if n < 2:
                raise DataError(f"{train.root}: class {c!r} has {n} image; data.val_split needs at least 2 per class (1 for train, 1 for val)",
                                hint="add images to that class, or give data.val")
        tr, va = stratified_split(train.targets, val_split, seed)
        base = train.root if train.root.is_dir() else train.root.parent
        names = "\n".join(os.path.relpath(train.files[i], base) for i in va)
        record["val_split"] = {"fraction": val_split, "seed": seed, "train_images": int(len(tr)), "val_images": int(len(va)),
                               "val_files_sha256": hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()}
        train, val = _subset(train, tr), _subset(train, va)
    else:
        val = read_split(val_path, "val")
        if train.root.is_dir() and val.root.is_dir():
            check_same_classes(train, val)
        val = relabel(val, train.classes, "val")
    if len(train.classes) < 2:
        check_same_classes(train, val)  # names the single class
    test = relabel(read_split(test_path, "test"), train.classes, "test") if test_path else None
    return Sources(train.classes, train, val, test, record)
