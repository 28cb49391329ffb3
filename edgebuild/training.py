"""Seeded, deterministic training loops shared by transfer and recovery (with distillation).

Under torchrun the same loops run data-parallel (DistributedDataParallel): see distributed.py."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .progress import Progress


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError("transfer.device is 'cuda' but CUDA is not available here", hint="use device: auto or cpu")
        # under torchrun, LOCAL_RANK picks this process's GPU
        return torch.device("cuda", distributed.local_rank()) if distributed.launched() else torch.device("cuda")
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


@torch.no_grad()
def predict_sharded(model: nn.Module, X: np.ndarray, batch_size: int = 256, device: torch.device | None = None) -> np.ndarray:
    """``predict`` with the rows shared out over the ranks (contiguous shards, all_gather)."""
    if not distributed.active():
        return predict(model, X, batch_size, device)
    lo, hi = distributed.shard_bounds(len(X))
    local = predict(model, X[lo:hi], batch_size, device)
    if hi == lo:  # an empty shard still needs the row shape for the all_gather
        local = predict(model, X[:1], batch_size, device)[:0]
    return distributed.gather_rows(local, len(X))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU has it, else fp16 (with a GradScaler)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    world_size: int = 1
    backend: str | None = None
    precision: str = "fp32"


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
    + (1 - alpha) * CE(hard). ``train_mode`` False keeps BatchNorm statistics frozen.

    Under torchrun: DistributedDataParallel; each rank trains on a disjoint shard of every
    epoch's permutation in local batches of ceil(batch_size / world size); the loss and the
    validation accuracy are reduced over all ranks; rank 0's BatchNorm statistics and weights
    are broadcast after every epoch, so every rank ends with the same model. On CUDA the
    forward runs under autocast (bf16, or fp16 with a GradScaler)."""
    device = device or torch.device("cpu")
    model.to(device)
    teacher_device = next((p.device for p in teacher.parameters()), None) if teacher is not None else None
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in params if p.requires_grad]
    world = distributed.world_size()
    half = amp_dtype(device)
    res = FitResult(world_size=world, backend=distributed.backend_for(device),
                    precision={None: "fp32", torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}[half])
    if epochs == 0 or not params:
        return res
    train_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers off: rank 0's BatchNorm statistics are broadcast once per epoch
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda") if half == torch.float16 else None
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    local_batch = math.ceil(batch_size / world)
    steps_per_epoch = math.ceil(math.ceil(len(Xt) / world) / local_batch)
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
            perm = distributed.epoch_shard(torch.randperm(len(Xt), generator=gen))
            total_loss, n = 0.0, 0
            for b in range(0, len(perm), local_batch):
                idx = perm[b : b + local_batch]
                xb, yb = Xt[idx].to(device), yt[idx].to(device)
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    logits = train_model(xb)
                    if teacher is not None and alpha > 0:
                        with torch.no_grad():
                            tl = teacher(xb)
                logits = logits.float()
                loss = F.cross_entropy(logits, yb)
                if teacher is not None and alpha > 0:
                    kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(tl.float() / temperature, 1), reduction="batchmean") * temperature**2
                    loss = alpha * kd + (1 - alpha) * loss
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                sched.step()
                total_loss += float(loss.detach()) * len(idx)
                n += len(idx)
                distributed.maybe_fail(label)
            res.epoch_seconds.append(time.perf_counter() - t0)
            distributed.broadcast_module(model, buffers_only=True)
            total_loss, n = distributed.sum_all(total_loss, n)
            val_acc = _val_accuracy(model, Xval, yval, device)
            res.history.append({"epoch": epoch + 1, "loss": total_loss / max(n, 1), "val_accuracy": val_acc})
            if task:
                task.update(epoch + 1, f"loss {total_loss / max(n, 1):.4f} val_acc {val_acc:.4f}")
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    distributed.broadcast_module(model)  # DDP keeps the weights equal; this makes it bit-exact, buffers included
    res.seconds = time.perf_counter() - t_start
    model.eval()
    if teacher is not None and teacher_device is not None:
        teacher.to(teacher_device)
    return res


def _val_accuracy(model: nn.Module, Xval: np.ndarray, yval: np.ndarray, device: torch.device) -> float:
    """Accuracy on the validation set; under torchrun every rank scores a shard and the
    correct counts are summed (the model is the same on every rank)."""
    if not len(yval):
        return 0.0
    lo, hi = distributed.shard_bounds(len(yval))
    correct = float((predict(model, Xval[lo:hi], device=device).argmax(1) == yval[lo:hi]).sum()) if hi > lo else 0.0
    correct, total = distributed.sum_all(correct, hi - lo)
    return correct / total
