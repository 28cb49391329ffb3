"""Reproduce the shipped example: backbone weights and the image folders.

    python examples/digits/make_example.py

1. Writes digits 5-9 of scikit-learn's bundled digits set as 32x32 grayscale PNGs into
   data/train and data/val (70/30 per class, seeded): the new task.
2. Pretrains the backbone on digits 0-4 (the old task) with the same preprocessing the build
   file declares and saves backbone.safetensors.
Everything is seeded and deterministic on CPU.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from backbone import build  # noqa: E402

SEED = 0
SIZE = 32


def to_image(x8):
    arr = np.clip(np.round(x8.reshape(8, 8) / 16.0 * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").resize((SIZE, SIZE), Image.BILINEAR)


def write_folders(X, y):
    rng = np.random.default_rng(SEED)
    names = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
    for split in ("train", "val"):
        for name in names.values():
            (HERE / "data" / split / name).mkdir(parents=True, exist_ok=True)
    for digit, name in names.items():
        idx = rng.permutation(np.flatnonzero(y == digit))
        cut = int(round(len(idx) * 0.7))
        for split, part in (("train", idx[:cut]), ("val", idx[cut:])):
            for i in part:
                to_image(X[i]).save(HERE / "data" / split / name / f"{i:04d}.png", optimize=False)


def pretrain(X, y):
    torch.manual_seed(SEED)
    mask = y < 5
    imgs = np.stack([np.asarray(to_image(x), dtype=np.float32) / 255.0 for x in X[mask]])
    xs = torch.from_numpy((imgs - 0.5) / 0.5).unsqueeze(1)
    ys = torch.from_numpy(y[mask]).long()
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(SEED)
    for epoch in range(8):
        model.train()
        perm = torch.randperm(len(xs), generator=g)
        for b in range(0, len(xs), 64):
            i = perm[b : b + 64]
            loss = torch.nn.functional.cross_entropy(model(xs[i]), ys[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xs).argmax(1) == ys).float().mean().item()
        print(f"pretrain epoch {epoch + 1}: loss {loss.item():.3f} train acc (digits 0-4) {acc:.3f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(HERE / "backbone.safetensors"))


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    digits = load_digits()
    write_folders(digits.data, digits.target)
    pretrain(digits.data, digits.target)
    print("wrote", HERE / "data", "and", HERE / "backbone.safetensors")
