"""Pretrain the HF ResNet-18 and MobileNetV2 configs on the textures example's task A at 224x224.

    python -m benchmarks.pretrain_textures --device cuda          # minutes on a GPU
    python -m benchmarks.pretrain_textures --device cpu --per-class 300 --epochs 6   # hours on 2 cores

The search and distillation benchmarks (benchmarks/search.py) need backbones with real
features: pruning a randomly initialised network and recovering it says nothing about a user's
pretrained one. Nothing can be downloaded here, so the backbones are pretrained on the textures
example's pretraining task (8 classes, drawn in memory by examples/textures/make_example.py,
never the 6 classes of the example itself) and saved with ``save_pretrained`` as local folders
that ``backbone.source: hf:<folder>`` loads. The 128x128 images are upsampled to 224x224 with
the same mean/std the benchmark's build files use. Writes ``<out>/<model>/`` (config.json,
model.safetensors) and ``<out>/pretrain.json`` (task-A held-out accuracy per epoch, seconds,
device).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the benchmark build files' preprocess
SIZE = 224


def task_a(per_class: int, held_out: int):
    sys.path.insert(0, str(ROOT / "examples" / "textures"))
    import make_example

    X, y = make_example.task_a("train", per_class)
    Xv, yv = make_example.task_a("val", held_out)
    return X, y, Xv, yv, make_example.TASK_A


def batches(torch, X, y, idx, train: bool, g):
    """uint8 NHWC -> normalised float NCHW at 224, with a random crop and flip when training."""
    import torch.nn.functional as F

    x = X[idx].permute(0, 3, 1, 2).float() / 255.0
    if train:
        s = int(128 * (0.7 + 0.3 * torch.rand(1, generator=g).item()))
        i, j = (int(torch.randint(0, 128 - s + 1, (1,), generator=g)) for _ in range(2))
        x = x[:, :, i : i + s, j : j + s]
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(3)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last), y[idx]


def train_one(kind: str, data, classes, epochs: int, device: str, out: Path, lr: float) -> dict:
    import torch
    import transformers

    from benchmarks.run import hf_config

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = hf_config(kind)
    cfg.num_labels = len(classes)
    cfg.id2label = dict(enumerate(classes))
    cfg.label2id = {c: i for i, c in enumerate(classes)}
    from edgebuild.training import pytorch_momentum

    model = transformers.AutoModelForImageClassification.from_config(cfg).to(device).to(memory_format=torch.channels_last)
    pytorch_momentum(model, None)  # HF MobileNetV2's BatchNorm momentum 0.997 is TensorFlow's decay: train with 0.003
    X, y, Xv, yv = (torch.as_tensor(a).to(device) for a in data)
    bs = 128
    steps = epochs * ((len(X) + bs - 1) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    log, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=g).to(device)
        for b in range(0, len(X), bs):
            xb, yb = batches(torch, X, y, perm[b : b + bs], True, g)
            with amp:
                loss = torch.nn.functional.cross_entropy(model(pixel_values=xb).logits.float(), yb.long(), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = 0
        with torch.no_grad(), amp:
            for b in range(0, len(Xv), 256):
                idx = torch.arange(b, min(b + 256, len(Xv)), device=device)
                xb, yb = batches(torch, Xv, yv, idx, False, g)
                correct += int((model(pixel_values=xb).logits.argmax(1) == yb).sum())
        acc = correct / len(Xv)
        log.append({"epoch": epoch + 1, "loss": loss.item(), "task_a_heldout_accuracy": acc, "seconds": time.perf_counter() - t0})
        print(f"{kind} epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, task-A held-out accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = model.float().cpu().to(memory_format=torch.contiguous_format)
    model.save_pretrained(out / kind, safe_serialization=True)
    return {"epochs": epochs, "lr": lr, "device": device, "log": log, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenetv2")
    ap.add_argument("--per-class", type=int, default=1200, help="task-A training images per class")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--device", default="cuda" if "--device" not in (argv or sys.argv) else None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".work" / "textures-hf")
    opts = ap.parse_args(argv)
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        opts.device = "cpu"
    t0 = time.perf_counter()
    X, y, Xv, yv, classes = task_a(opts.per_class, 100)
    print(f"task A: {len(X)} training, {len(Xv)} held-out images drawn in {time.perf_counter() - t0:.0f} s", flush=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    res = {"per_class": opts.per_class, "held_out": len(Xv), "command": "python -m benchmarks.pretrain_textures " + " ".join(argv or sys.argv[1:]),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if opts.device == "cuda" else None, "models": {}}
    for kind in opts.models.split(","):
        res["models"][kind] = train_one(kind, (X, y, Xv, yv), classes, opts.epochs, opts.device, opts.out, lr=2e-3)
        (opts.out / "pretrain.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
