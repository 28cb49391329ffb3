"""The realistic example: procedural textures in clutter, 128x128 RGB, generated offline.

    python examples/textures/make_example.py              # images (skipped when up to date)
    python examples/textures/make_example.py --pretrain   # also pretrain backbone.safetensors again

Two related but different tasks, drawn by the same generator:

- task A (pretraining, 8 classes): stripes, checks, dots, grid, waves, rings, zigzag, blobs.
  Made in memory; the backbone (backbone.py) is trained on them and saved as
  backbone.safetensors (committed; --pretrain reproduces it).
- task B (the example, 6 new classes): bricks, crosshatch, herringbone, hexdots, plaid, spiral.
  Written as PNG folders into data/ (gitignored): train (400 per class), val (100), test (100)
  and train-fewshot (the first 20 of each train class).

Each image: the class texture at a random scale, angle and warp in two random colours (sometimes
of low contrast), under an illumination gradient, partly covered by 0-3 clutter polygons and
strokes, then blurred and noised. Several class pairs are confusable on purpose (bricks/grid,
crosshatch/plaid/checks, hexdots/dots, herringbone/zigzag). Every image is drawn from its own
seeded generator (worker processes share the work), so the files are byte-identical on every
run with the same numpy and Pillow. Pretraining is seeded and deterministic on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SEED = 0
SIZE = 128
TASK_A = ["stripes", "checks", "dots", "grid", "waves", "rings", "zigzag", "blobs"]
TASK_B = ["bricks", "crosshatch", "herringbone", "hexdots", "plaid", "spiral"]
SPLITS = {"train": 400, "val": 100, "test": 100}
FEWSHOT = 20
PRETRAIN_PER_CLASS = 400
MEAN, STD = 0.5, 0.25  # the build files' preprocess.mean / std (per channel)

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# textures: a coverage map t(x, y) in [0, 1] per class, on warped, rotated coordinates
# ----------------------------------------------------------------------------------------------


def _tri(x):
    """Triangle wave of period 1, values in [0, 1]."""
    return 2 * np.abs(x - np.floor(x + 0.5))


def _lines(c, p, w):
    return ((c % p) < w).astype(np.float32)


def _dots(u, v, p, r):
    return (((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 < r * r).astype(np.float32)


def _blobs(rng, cells):
    small = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) / 255.0


def coverage(name: str, rng: np.random.Generator) -> np.ndarray:
    p = rng.uniform(7, 18)                      # period in pixels
    phi = rng.uniform(0, np.pi)
    amp, lam = rng.uniform(0, 3), rng.uniform(30, 90)
    x = _XX + amp * np.sin(2 * np.pi * _YY / lam + rng.uniform(0, 6.3))
    y = _YY + amp * np.sin(2 * np.pi * _XX / lam + rng.uniform(0, 6.3))
    u = x * np.cos(phi) + y * np.sin(phi) + rng.uniform(0, p)
    v = -x * np.sin(phi) + y * np.cos(phi) + rng.uniform(0, p)
    w = p * rng.uniform(0.15, 0.3)              # line width
    if name == "stripes":
        return (np.sin(2 * np.pi * u / p) > rng.uniform(-0.4, 0.4)).astype(np.float32)
    if name == "checks":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if name == "dots":
        return _dots(u, v, p, p * rng.uniform(0.2, 0.38))
    if name == "grid":
        return np.maximum(_lines(u, p, w), _lines(v, p, w))
    if name == "waves":
        return (np.sin(2 * np.pi * (u + rng.uniform(3, 8) * np.sin(2 * np.pi * v / rng.uniform(25, 60))) / p) > 0).astype(np.float32)
    if name == "rings":
        cx, cy = rng.uniform(-40, SIZE + 40, 2)
        return (np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / p) > 0).astype(np.float32)
    if name == "zigzag":
        return (np.sin(2 * np.pi * (u + p * 1.2 * _tri(v / (2 * p))) / p) > 0).astype(np.float32)
    if name == "blobs":
        return (_blobs(rng, int(rng.integers(5, 12))) > rng.uniform(0.4, 0.6)).astype(np.float32)
    if name == "bricks":
        row = np.floor(v / p)
        return np.maximum(_lines(v, p, w * 0.8), _lines(u + (row % 2) * p, 2 * p, w * 0.8))
    if name == "crosshatch":
        a = rng.uniform(np.pi / 4, np.pi / 2)
        u2 = x * np.cos(phi + a) + y * np.sin(phi + a)
        return np.maximum(_lines(u, p, w * 0.7), _lines(u2, p, w * 0.7))
    if name == "herringbone":
        col = np.floor(u / (1.5 * p))
        return (np.sin(2 * np.pi * (v + np.where(col % 2 == 0, 1, -1) * (u % (1.5 * p))) / p) > 0).astype(np.float32)
    if name == "hexdots":
        v2 = v + (np.floor(u / (p * 0.866)) % 2) * p / 2
        return _dots(u, v2, p, p * rng.uniform(0.2, 0.36))
    if name == "plaid":
        s1 = (np.sin(2 * np.pi * u / p) > 0.3).astype(np.float32)
        s2 = (np.sin(2 * np.pi * v / (p * rng.uniform(0.6, 1.6))) > 0.3).astype(np.float32)
        return 0.5 * (s1 + s2)
    if name == "spiral":
        cx, cy = rng.uniform(20, SIZE - 20, 2)
        r, th = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
        return (np.sin(2 * np.pi * r / p + int(rng.integers(1, 4)) * th) > 0).astype(np.float32)
    raise KeyError(name)


def _colour(rng):
    return rng.uniform(0, 255, 3).astype(np.float32)


def draw(name: str, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of the texture class ``name``."""
    c1 = _colour(rng)
    c2 = np.clip(c1 + rng.normal(0, 45, 3), 0, 255) if rng.uniform() < 0.25 else _colour(rng)  # low contrast
    t = coverage(name, rng)[..., None]
    img = c1 * (1 - t) + c2 * t
    g = rng.uniform(0.55, 1.0) + rng.uniform(0, 0.45) * (_XX * np.cos(a := rng.uniform(0, 6.3)) + _YY * np.sin(a)) / SIZE
    img = img * np.clip(g, 0.3, 1.4)[..., None]
    layer = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(layer)
    clutter = np.zeros((SIZE, SIZE, 3), np.float32)
    for _ in range(rng.integers(0, 4)):  # clutter polygons in flat or blotchy colours
        n = int(rng.integers(4, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(8, 30) * rng.uniform(0.5, 1.0, n)
        cx, cy = rng.uniform(0, SIZE, 2)
        d.polygon([(float(cx + r * np.cos(q)), float(cy + r * np.sin(q))) for r, q in zip(rad, ang)], fill=255)
    for _ in range(rng.integers(0, 3)):  # strokes
        d.line([tuple(rng.uniform(0, SIZE, 2)), tuple(rng.uniform(0, SIZE, 2))], fill=255, width=int(rng.integers(3, 9)))
    m = np.asarray(layer, dtype=np.float32)[..., None] / 255.0
    clutter[:] = _colour(rng)
    clutter = clutter * (0.6 + 0.4 * _blobs(rng, 4)[..., None])
    img = img * (1 - m) + clutter * m
    out = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.4))))
    arr = np.asarray(out, dtype=np.float32) + rng.normal(0, rng.uniform(3, 22), (SIZE, SIZE, 3))
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def image_rng(task: str, split: str, cls: int, i: int) -> np.random.Generator:
    tag = int.from_bytes(hashlib.sha256(f"{task}/{split}".encode()).digest()[:4], "little")
    return np.random.default_rng([SEED, tag, cls, i])


# ----------------------------------------------------------------------------------------------
# task B on disk, task A in memory
# ----------------------------------------------------------------------------------------------


def generator_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _write_one(path: Path, split: str, ci: int, i: int) -> None:
    Image.fromarray(draw(TASK_B[ci], image_rng("B", split, ci, i))).save(path, compress_level=1)


def _draw_a(split: str, ci: int, i: int) -> np.ndarray:
    return draw(TASK_A[ci], image_rng("A", split, ci, i))


def write_folders(root: Path) -> None:
    stamp = root / ".generated"
    if stamp.is_file() and json.loads(stamp.read_text()).get("generator") == generator_hash():
        print(f"{root}: up to date")
        return
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    jobs = []
    for split, count in SPLITS.items():
        for ci, name in enumerate(TASK_B):
            (root / split / name).mkdir(parents=True)
            jobs += [(root / split / name / f"{i:04d}.png", split, ci, i) for i in range(count)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.starmap(_write_one, jobs, chunksize=32)
    for name in TASK_B:
        (root / "train-fewshot" / name).mkdir(parents=True)
        for i in range(FEWSHOT):
            shutil.copyfile(root / "train" / name / f"{i:04d}.png", root / "train-fewshot" / name / f"{i:04d}.png")
    stamp.write_text(json.dumps({"generator": generator_hash(), "images": len(jobs)}))
    print(f"wrote {len(jobs)} images (+{FEWSHOT * len(TASK_B)} few-shot copies) to {root} in {time.perf_counter() - t0:.0f} s")


def task_a(split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    jobs = [(split, ci, i) for ci in range(len(TASK_A)) for i in range(per_class)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        X = np.stack(pool.starmap(_draw_a, jobs, chunksize=32))
    return X, np.repeat(np.arange(len(TASK_A)), per_class)


def pretrain(epochs: int) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    from backbone import build

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    Xa, ya = task_a("train", PRETRAIN_PER_CLASS)
    Xv, yv = task_a("val", 50)
    print(f"task A: {len(Xa)} training and {len(Xv)} held-out images drawn in {time.perf_counter() - t0:.0f} s")

    def tensor(X):
        return (torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD

    xs, ys, xv, yvt = tensor(Xa), torch.from_numpy(ya).long(), tensor(Xv), torch.from_numpy(yv).long()
    model = build()
    bs = 64
    steps = epochs * ((len(xs) + bs - 1) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=g)
        for b in range(0, len(xs), bs):
            i = perm[b : b + bs]
            loss = torch.nn.functional.cross_entropy(model(xs[i]), ys[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((torch.cat([model(xv[j : j + 200]) for j in range(0, len(xv), 200)]).argmax(1) == yvt).float().mean())
        print(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, task-A held-out accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(HERE / "backbone.safetensors"))
    print(f"wrote {HERE / 'backbone.safetensors'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain", action="store_true", help="pretrain backbone.safetensors on task A again")
    ap.add_argument("--epochs", type=int, default=12, help="pretraining epochs (the committed weights: 12)")
    ap.add_argument("--out", type=Path, default=HERE / "data")
    args = ap.parse_args()
    write_folders(args.out)
    if args.pretrain or not (HERE / "backbone.safetensors").is_file():
        pretrain(args.epochs)
