"""Seeded, deterministic training loops shared by transfer and recovery (with distillation)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .progress import Progress


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError("transfer.device is 'cuda' but CUDA is not available here", hint="use device: auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray | torch.Tensor, batch_size: int = 256, device: torch.device | None = None) -> np.ndarray:
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    X = torch.as_tensor(X)
    outs = []
    for b in range(0, len(X), batch_size):
        outs.append(model(X[b : b + batch_size].to(device)).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    X: np.ndarray,
    y: np.ndarray,
    Xval: np.ndarray,
    yval: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    device: torch.device | None = None,
    progress: Optional[Progress] = None,
    label: str = "train",
    teacher: Optional[nn.Module] = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    train_mode: bool = True,
) -> FitResult:
    """SGD with momentum and a cosine schedule. With a teacher: loss = alpha * T^2 * KL(soft)
    + (1 - alpha) * CE(hard). ``train_mode`` False keeps BatchNorm statistics frozen."""
    device = device or torch.device("cpu")
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in params if p.requires_grad]
    res = FitResult()
    if epochs == 0 or not params:
        return res
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    steps_per_epoch = math.ceil(len(Xt) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    gen = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()
    ctx = progress.task(label, epochs) if progress else None
    task = ctx.__enter__() if ctx else None
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            model.train(train_mode)
            perm = torch.randperm(len(Xt), generator=gen)
            total_loss, n = 0.0, 0
            for b in range(0, len(Xt), batch_size):
                idx = perm[b : b + batch_size]
                xb, yb = Xt[idx].to(device), yt[idx].to(device)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if teacher is not None and alpha > 0:
                    with torch.no_grad():
                        tl = teacher(xb)
                    kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(tl / temperature, 1), reduction="batchmean") * temperature**2
                    loss = alpha * kd + (1 - alpha) * loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * len(idx)
                n += len(idx)
            res.epoch_seconds.append(time.perf_counter() - t0)
            val_acc = float((predict(model, Xval, device=device).argmax(1) == yval).mean()) if len(yval) else 0.0
            res.history.append({"epoch": epoch + 1, "loss": total_loss / max(n, 1), "val_accuracy": val_acc})
            if task:
                task.update(epoch + 1, f"loss {total_loss / max(n, 1):.4f} val_acc {val_acc:.4f}")
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    res.seconds = time.perf_counter() - t_start
    model.eval()
    return res
