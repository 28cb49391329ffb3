"""``edgebuild init``: a commented edgebuild.yaml made from what is in the data folder.

It finds the classes and the train/val(/test) layout, suggests an input size, colour mode and
normalisation from a sample of the images, lists the targets this host can run, and writes the
training defaults out so the user sees them. It never overwrites a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from .config import BuildConfig, DataConfig, TransferConfig
from .errors import ConfigError, DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SIZES = (32, 64, 96, 128, 160, 192, 224)
SAMPLE = 64
VAL_NAMES = ("val", "valid", "validation")
BUILTIN = {"rgb": "python:edgebuild.models:small_cnn", "grayscale": "python:edgebuild.models:small_cnn_gray"}


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(p: Path) -> list[Path]:
    return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not f.name.startswith("."))


def layout(data: Path) -> dict:
    """``{"train": Path, "val": Path | None, "test": Path | None, "classes": {name: count}}``."""
    if not data.is_dir():
        raise DataError(f"data folder not found: {data}", hint="pass --data with a folder of class sub-folders (or train/ and val/ folders of them)")
    subs = {d.name.lower(): d for d in _subdirs(data)}
    if "train" in subs:
        train = subs["train"]
        val = next((subs[n] for n in VAL_NAMES if n in subs), None)
        test = subs.get("test")
    else:
        train, val, test = data, None, None
    classes = {d.name: len(_images(d)) for d in _subdirs(train)}
    if len(classes) < 2:
        raise DataError(f"{train}: found {len(classes)} class folder(s); a classifier needs at least 2",
                        hint="put the images in one sub-folder per class (folder names are the labels), or train/ and val/ folders of them")
    empty = [c for c, n in classes.items() if n == 0]
    if empty:
        raise DataError(f"{train}: class folder(s) with no images: {', '.join(empty)}", hint=f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder")
    return {"train": train, "val": val, "test": test, "classes": classes}


def suggest_preprocess(train: Path, classes: list[str]) -> dict:
    """Input size, colour mode, resize mode, mean and std from up to SAMPLE images spread over
    the classes."""
    import numpy as np
    from PIL import Image

    per = max(1, SAMPLE // len(classes))
    files = [f for c in classes for f in _images(train / c)[:per]][:SAMPLE]
    sizes, gray, pixels = [], True, []
    for f in files:
        try:
            with Image.open(f) as im:
                im.draft("RGB", (256, 256))  # JPEG: decode at a reduced scale, enough for statistics
                sizes.append(im.size)  # (w, h) as stored
                rgb = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{f}: cannot read the image ({e})", hint="remove or replace the file") from None
        if im.mode not in ("1", "L", "LA", "I", "I;16", "F", "P") and not (np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 1], rgb[..., 2])):
            gray = False
        pixels.append(rgb)
    color = "grayscale" if gray else "rgb"
    ws, hs = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    side = float(np.median(np.minimum(ws, hs)))
    size = next((s for s in SIZES if s >= side), SIZES[-1])
    aspect = ws / hs
    resize = "center-crop" if float(np.ptp(aspect)) > 0.1 or abs(float(np.median(aspect)) - 1) > 0.1 else "stretch"
    stack = np.stack(pixels)
    if gray:
        stack = stack.mean(axis=-1, keepdims=True)
    mean = [round(float(v), 3) for v in stack.mean(axis=(0, 1, 2))]
    std = [round(max(float(v), 0.01), 3) for v in stack.std(axis=(0, 1, 2))]
    return {"input_size": [size, size], "color": color, "resize": resize, "mean": mean, "std": std,
            "seen": {"images": len(files), "median_size": f"{int(np.median(ws))}x{int(np.median(hs))}", "aspect": [round(float(aspect.min()), 2), round(float(aspect.max()), 2)]}}


def host_targets() -> list[str]:
    from .profiles import ProfileRegistry, unavailable_reason

    reg = ProfileRegistry()
    return [n for n in reg.names() if unavailable_reason(reg.get(n)) is None]


def _rel(p: Path, base: Path) -> str:
    try:
        return os.path.relpath(p.resolve(), base.resolve()).replace(os.sep, "/")
    except ValueError:  # another drive (Windows)
        return str(p.resolve())


def _v(x) -> str:
    """A YAML flow value: a plain word where YAML reads it back as the same string, else JSON
    (which is YAML)."""
    import yaml

    if isinstance(x, str) and re.fullmatch(r"[A-Za-z_.][A-Za-z0-9._/:-]*", x) and yaml.safe_load(x) == x:
        return x
    if isinstance(x, list):
        return "[" + ", ".join(_v(v) for v in x) + "]"
    return json.dumps(x, ensure_ascii=False)


def _c(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]", " ", str(text))


def render(dirpath: Path, data: Path, backbone: Optional[str], weights: Optional[Path], targets: list[str], host: bool = False) -> str:
    lay = layout(data)
    classes = list(lay["classes"])
    pre = suggest_preprocess(lay["train"], classes)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", dirpath.resolve().name).strip("-._") or "model"
    name = name if re.match(r"[A-Za-z0-9]", name) else "model"
    source = backbone or BUILTIN["grayscale" if pre["color"] == "grayscale" else "rgb"]
    pretrained = bool(weights) or (source.startswith("hf:") and any((dirpath / source[3:]).glob("*.safetensors")))
    mode = "finetune" if pretrained else "scratch"
    counts = ", ".join(f"{c} ({n})" for c, n in lay["classes"].items())
    seen = pre["seen"]
    L = [f"# edgebuild.yaml written by 'edgebuild init' from {_c(_rel(data, dirpath))}.",
         "# Every key is checked (unknown keys are errors); relative paths resolve against this file.",
         "# Reference: README.md 'The build file'.  Next: edgebuild build --dry-run, then edgebuild build",
         f"name: {_v(name)}", "version: 0.1.0", "seed: 0", "",
         "backbone:"]
    if backbone:
        L.append(f"  source: {_v(source)}")
    else:
        L += ["  # no --backbone given: a small built-in CNN trained from scratch (a baseline for small images).",
              "  # For transfer learning give a pretrained one: python:FILE.py:FUNC | hf:ID_OR_DIR | timm:NAME | torchvision:NAME",
              f"  source: {_v(source)}"]
    if weights:
        L.append(f"  weights: {_v(_rel(weights, dirpath))}   # .safetensors or a state-dict .pt")
    L += ["  # classifier: fc   # the old head to replace; default: the last nn.Linear", "",
          f"# classes found ({len(classes)}, folder names are the labels): {_c(counts)}",
          "data:", f"  train: {_v(_rel(lay['train'], dirpath))}"]
    if lay["val"] is not None:
        L.append(f"  val: {_v(_rel(lay['val'], dirpath))}")
    elif "val_split" in DataConfig.model_fields:
        L.append("  val_split: 0.2   # no val/ folder found: a seeded, stratified 20% of train is held out")
    else:
        raise DataError(f"{data}: no val/ folder next to train/", hint="split the images into train/ and val/ folders of class sub-folders")
    if lay["test"] is not None:
        line = f"test: {_v(_rel(lay['test'], dirpath))}   # never used for selection or calibration"
        L.append(f"  {line}" if "test" in DataConfig.model_fields else f"  # {line} (not supported by this version)")
    L += ["", f"# suggested from {seen['images']} sample images (median {seen['median_size']}, aspect w/h {seen['aspect'][0]}-{seen['aspect'][1]})",
          "preprocess:",
          f"  input_size: {_v(pre['input_size'])}   # height, width",
          f"  color: {pre['color']}   # rgb | bgr | grayscale",
          f"  resize: {pre['resize']}   # stretch | letterbox | center-crop",
          f"  mean: {_v(pre['mean'])}   # of the sample images, 0..1 scale" + ("; a pretrained backbone may expect its own (ImageNet: [0.485, 0.456, 0.406])" if backbone and pre["color"] != "grayscale" else ""),
          f"  std: {_v(pre['std'])}", "",
          "# training (the defaults, written out)" + ("" if pretrained else "; no weights given, so mode is scratch"),
          "transfer:"]
    L += _transfer_lines(mode)
    L += ["", "# compress:   # optional", "#   prune: {ratio: 0.5}", "#   distill: {temperature: 4.0, alpha: 0.5}",
          "#   quantize: {calibration_samples: 300}", "",
          "# the targets this host can build and validate (edgebuild targets list shows all)" if host else "# the targets given to init",
          f"targets: {_v(targets)}", "",
          "# budgets override the targets' default limits (edgebuild targets show NAME); examples:",
          "# budgets: {max_accuracy_drop: 0.02, max_latency_ms: 10, max_size_mb: 5, min_agreement: 0.95}", ""]
    return "\n".join(L)


def _transfer_lines(mode: str) -> list[str]:
    out = []
    for key, f in TransferConfig.model_fields.items():
        value = mode if key == "mode" else f.get_default(call_default_factory=True)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if value is None:
            line = f"  # {key}:"
        else:
            line = f"  {key}: {_v(list(value) if isinstance(value, tuple) else value)}"
        if f.description:
            line += f"   # {_c(f.description)}"
        elif key == "mode":
            line += "   # finetune | features (frozen backbone) | scratch"
        out.append(line)
    return out


def init(dirpath: Path, data: Optional[Path], backbone: Optional[str], weights: Optional[Path], targets: list[str]) -> Path:
    import yaml
    from pydantic import ValidationError

    dirpath = Path(dirpath)
    out = dirpath / "edgebuild.yaml"
    if out.exists():
        raise ConfigError(f"{out} already exists; init never overwrites a build file", hint="edit it, remove it, or give init another folder")
    if data is None:
        data = dirpath / "data"
        if not data.is_dir():
            raise DataError(f"no --data given and no data/ folder in {dirpath}", hint="edgebuild init [DIR] --data PATH (a folder of class sub-folders, or train/ and val/ folders of them)")
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"weights file not found: {weights}", hint="--weights takes a .safetensors or state-dict .pt file")
    if backbone is not None:
        from .config import BackboneConfig

        try:
            BackboneConfig(source=backbone)
        except ValidationError as e:
            raise ConfigError(f"--backbone {backbone!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}", hint="SOURCE is python:FILE.py:FUNC | hf:ID_OR_DIR | timm:NAME | torchvision:NAME") from None
    host = not targets
    if targets:
        from .profiles import ProfileRegistry

        reg = ProfileRegistry([dirpath / "targets"])
        for t in targets:
            reg.get(t)  # unknown names: the closest valid one
    else:
        targets = host_targets()
    text = render(dirpath, Path(data), backbone, Path(weights) if weights else None, list(targets), host)
    try:
        BuildConfig.model_validate(yaml.safe_load(text))
    except ValidationError as e:  # pragma: no cover - a bug in the scaffold, not the user's input
        raise AssertionError(f"init wrote an invalid build file: {e}") from e
    dirpath.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as f:  # "x": never overwrite, even in a race
        f.write(text)
    return out
