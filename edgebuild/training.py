"""Seeded, deterministic training loops shared by transfer and recovery (with distillation).

Under torchrun the same loops run data-parallel (DistributedDataParallel): see distributed.py."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
from .lazy import torch, nn, F, no_grad

from . import distributed
from .progress import Progress

NOTE_SECONDS = 2.0  # progress within an epoch: at most one line this often


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


def main_logits(out):
    """A model's class scores from its training-mode output: GoogLeNet and Inception v3 return
    their auxiliary classifiers' too there (a named tuple with ``logits``; eval mode, which
    export and validation use, returns the tensor alone). The auxiliary heads are not trained."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    from .errors import ModelError

    raise ModelError(f"the model's training-mode output is a {type(out).__name__}, not a tensor of class scores",
                     hint="make forward() return the logits (a tensor, or an object with .logits)")


def load_state(module: nn.Module, sd: dict) -> None:
    """``module.load_state_dict(sd, strict=True)`` for a state dict without per-module
    ``_metadata`` (one read from safetensors, or a copied dict): the module's own versions are
    used, as a state dict saved by torch.save would carry them. torchvision's MNASNet, for one,
    refuses a state dict without its version."""
    if getattr(sd, "_metadata", None) is None:
        meta = getattr(module.state_dict(), "_metadata", None)
        sd = OrderedDict(sd)
        if meta is not None:
            sd._metadata = meta
    module.load_state_dict(sd, strict=True)


@no_grad
def predict(model: nn.Module, X, batch_size: int = 64, device: torch.device | None = None, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Outputs for rows [lo, hi) of ``X`` (an array, a tensor or a store.ImageArray), read batch by batch."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    hi = len(X) if hi is None else hi
    outs = []
    for b in range(lo, hi, batch_size):
        outs.append(model(torch.as_tensor(X[b : min(b + batch_size, hi)]).to(device)).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU has it, else fp16 (with a GradScaler)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None  # the epoch whose weights the model holds (best val accuracy)
    stopped_early: bool = False
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
    optimizer: str = "sgd",
    label_smoothing: float = 0.0,
    patience: int | None = None,
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> FitResult:
    """``optimizer`` sgd (momentum 0.9) or adamw; the lr warms up linearly over the first epoch
    (at most 10% of the steps), then follows a cosine decay to 0. ``augment`` transforms each
    training batch (never val). The model ends with the weights of its best epoch by val
    accuracy (the first of equals); ``patience`` stops after that many epochs without a better
    one. With a teacher: loss = alpha * T^2 * KL(soft) + (1 - alpha) * CE(hard, with
    ``label_smoothing``). ``train_mode`` False keeps BatchNorm statistics frozen.

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
    tf_style = pytorch_momentum(model, progress)
    train_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers off: rank 0's BatchNorm statistics are broadcast once per epoch
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda") if half == torch.float16 else None
    yt = torch.as_tensor(np.asarray(y))
    local_batch = math.ceil(batch_size / world)
    steps_per_epoch = math.ceil(math.ceil(len(yt) / world) / local_batch)
    total_steps = max(1, epochs * steps_per_epoch)
    warm = min(steps_per_epoch, total_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warm, total_steps))
    gen = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()
    ctx = progress.task(label, total_steps) if progress else None
    task = ctx.__enter__() if ctx else None
    best_acc, best_state, since_best = -1.0, None, 0
    step = 0
    last_note = time.perf_counter()
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            model.train(train_mode)
            perm = distributed.epoch_shard(torch.randperm(len(yt), generator=gen))
            total_loss, n = 0.0, 0
            for b in range(0, len(perm), local_batch):
                idx = perm[b : b + local_batch]
                rows = np.sort(idx.numpy())  # sorted: the store reads runs of rows at once
                xb, yb = torch.as_tensor(X[rows]), yt[rows]
                if augment is not None:
                    xb = augment(xb)
                xb, yb = xb.to(device), yb.to(device)
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    logits = train_model(xb)
                    if teacher is not None and alpha > 0:
                        with torch.no_grad():
                            tl = teacher(xb)
                logits = main_logits(logits).float()
                loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
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
                step += 1
                distributed.maybe_fail(label)
                now = time.perf_counter()
                if task and now - last_note >= NOTE_SECONDS and b + local_batch < len(perm):
                    last_note = now
                    eta = (now - t_start) / step * (total_steps - step)
                    task.update(step, f"epoch {epoch + 1}/{epochs} step {b // local_batch + 1}/{steps_per_epoch} "
                                      f"loss {total_loss / max(n, 1):.4f} ETA {eta:.0f}s")
            res.epoch_seconds.append(time.perf_counter() - t0)
            distributed.broadcast_module(model, buffers_only=True)
            total_loss, n = distributed.sum_all(total_loss, n)
            val_acc = _val_accuracy(model, Xval, yval, device)
            res.history.append({"epoch": epoch + 1, "loss": total_loss / max(n, 1), "val_accuracy": val_acc})
            if val_acc > best_acc:  # the same on every rank: val accuracy is reduced over all of them
                best_acc, since_best, res.best_epoch = val_acc, 0, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            if task:
                eta = (time.perf_counter() - t_start) / (epoch + 1) * (epochs - epoch - 1)
                task.update(step, f"epoch {epoch + 1}/{epochs} loss {total_loss / max(n, 1):.4f} val_acc {val_acc:.4f} ETA {eta:.0f}s")
                last_note = time.perf_counter()
            if patience is not None and since_best >= patience and epoch + 1 < epochs:
                res.stopped_early = True
                break
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
        for m, momentum in tf_style:
            m.momentum = momentum
    if best_state is not None and res.best_epoch != len(res.history):
        load_state(model, best_state)
    distributed.broadcast_module(model)  # DDP keeps the weights equal; this makes it bit-exact, buffers included
    res.seconds = time.perf_counter() - t_start
    model.eval()
    if teacher is not None and teacher_device is not None:
        teacher.to(teacher_device)
    return res


def pytorch_momentum(model: nn.Module, progress: Optional[Progress]) -> list:
    """BatchNorm layers whose momentum is a TensorFlow-style decay (0.99, 0.997: Hugging Face's
    MobileNetV2 sets 0.997) would let every training batch replace the running statistics
    (PyTorch weighs the new batch by ``momentum``): a model left at chance level after a few
    steps. They train with ``1 - momentum``; the caller's value is restored afterwards."""
    changed = [(m, m.momentum) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum > 0.5]
    for m, momentum in changed:
        m.momentum = 1.0 - momentum
    if changed and progress is not None:
        progress.log(f"  note: {len(changed)} BatchNorm layer(s) have momentum {changed[0][1]} (a TensorFlow-style decay); "
                     f"training uses {1.0 - changed[0][1]:.3g}, the PyTorch equivalent")
    return changed


def lr_factor(step: int, warm: int, total: int) -> float:
    """The lr multiplier at ``step``: linear warm-up over ``warm`` steps, then cosine to 0."""
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))


def _val_accuracy(model: nn.Module, Xval: np.ndarray, yval: np.ndarray, device: torch.device) -> float:
    """Accuracy on the validation set; under torchrun every rank scores a shard and the
    correct counts are summed (the model is the same on every rank)."""
    if not len(yval):
        return 0.0
    lo, hi = distributed.shard_bounds(len(yval))
    correct = float((predict(model, Xval, device=device, lo=lo, hi=hi).argmax(1) == yval[lo:hi]).sum()) if hi > lo else 0.0
    correct, total = distributed.sum_all(correct, hi - lo)
    return correct / total
