"""Transfer: the pretrained backbone gets a new head for the task's classes and is trained.

Modes: ``finetune`` (all weights; optional head-only warm-up), ``features`` (frozen backbone:
features computed once, the head trained on them), ``scratch`` (same architecture, random
init: the baseline).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import backbones, distributed
from ..config import BuildConfig
from ..errors import ModelError
from ..metrics import count_macs, count_params
from ..training import fit, pick_device, predict, predict_sharded, seed_everything

NAME = "transfer"
VERSION = 3  # 3: world size, backend and precision of training in meta; autocast on CUDA


def example_input(cfg: BuildConfig) -> torch.Tensor:
    h, w = cfg.preprocess.input_size
    return torch.zeros(1, cfg.preprocess.channels, h, w)


def build_architecture(cfg: BuildConfig, num_classes: int, load_pretrained: bool) -> tuple[nn.Module, str, int]:
    """The backbone with its new head: (model, head module name, feature size)."""
    pretrained = cfg.backbone.pretrained if load_pretrained else False
    model = backbones.factory(cfg.backbone.source, cfg.root, pretrained)()
    if load_pretrained and cfg.backbone.weights:
        backbones.load_weights(model, cfg.resolve(cfg.backbone.weights))
    head = backbones.find_head(model, cfg.backbone.classifier)
    seed_everything(cfg.seed)
    feats = backbones.replace_head(model, head, num_classes, example_input(cfg))
    return model.eval(), head, feats


def run(cfg: BuildConfig, data, out: Path, progress) -> dict:
    tc = cfg.transfer
    device = pick_device(tc.device)
    seed_everything(cfg.seed)
    model, head, feats = build_architecture(cfg, len(data.classes), load_pretrained=tc.mode != "scratch")
    if tc.mode == "scratch":
        seed_everything(cfg.seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
    history: list[dict] = []
    epoch_seconds: list[float] = []
    fits = []
    t0 = time.perf_counter()
    common = dict(batch_size=tc.batch_size, seed=cfg.seed, weight_decay=tc.weight_decay, device=device, progress=progress)
    if tc.mode == "features":
        fmodel, head_mod = backbones.split_features(model, head)
        for p in fmodel.parameters():
            p.requires_grad_(False)
        tf = time.perf_counter()
        # under torchrun each rank computes a shard of the features; all_gather joins them
        Ftr = predict_sharded(fmodel, data.Xtrain, device=device)
        Fva = predict_sharded(fmodel, data.Xval, device=device)
        feature_seconds = time.perf_counter() - tf
        check = predict(model, data.Xval[:4], device=device)
        head_out = predict(head_mod, Fva[:4], device=device)
        if Ftr.ndim != 2 or not np.allclose(check, head_out, atol=1e-4):
            raise ModelError(
                f"features mode needs the head '{head}' to be the last layer (model(x) == head(features(x)))",
                hint="use transfer.mode: finetune for this backbone, or name the final layer as backbone.classifier",
            )
        r = fit(head_mod, head_mod.parameters(), Ftr, data.ytrain, Fva, data.yval, epochs=tc.epochs, lr=tc.lr, label="transfer (features: head on cached features)", **common)
        history, epoch_seconds = r.history, r.epoch_seconds
        fits.append(r)
    else:
        feature_seconds = 0.0
        if tc.mode == "finetune" and tc.warmup_epochs:
            head_params = set(id(p) for p in model.get_submodule(head).parameters())
            for p in model.parameters():
                p.requires_grad_(id(p) in head_params)
            r = fit(model, model.parameters(), data.Xtrain, data.ytrain, data.Xval, data.yval, epochs=tc.warmup_epochs, lr=tc.lr, label="transfer (head warm-up)", **common)
            history += [dict(h, phase="warmup") for h in r.history]
            epoch_seconds += r.epoch_seconds
            fits.append(r)
            for p in model.parameters():
                p.requires_grad_(True)
        r = fit(model, model.parameters(), data.Xtrain, data.ytrain, data.Xval, data.yval, epochs=tc.epochs, lr=tc.lr, label=f"transfer ({tc.mode})", **common)
        history += r.history
        epoch_seconds += r.epoch_seconds
        fits.append(r)
    model = model.cpu().eval()
    from .prune import torch_latency

    host_latency = None
    if distributed.is_main():  # the other ranks only trained along; their latency would disturb rank 0's
        with torch.inference_mode():
            host_latency = torch_latency(model, example=example_input(cfg))[0]
    val_logits = predict(model, data.Xval)
    val_acc = float((val_logits.argmax(1) == data.yval).mean())
    save_model(model, out)
    np.save(out / "val_logits.npy", val_logits.astype(np.float32))
    meta = {
        "mode": tc.mode,
        "head": head,
        "features": feats,
        "classes": list(data.classes),
        "device": str(device),
        # where training ran: processes (torchrun world size), their collectives' backend, precision
        "world_size": distributed.world_size(),
        "backend": distributed.backend_for(device),
        "precision": fits[-1].precision if fits else "fp32",
        "val_accuracy": val_acc,
        "params": count_params(model),
        "macs": count_macs(model, example_input(cfg)),
        "host_latency": host_latency,
        "history": history,
        "seconds": time.perf_counter() - t0,
        "feature_seconds": feature_seconds,
        "epoch_seconds": epoch_seconds,
        "mean_epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def save_model(model: nn.Module, out: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_model(cfg: BuildConfig, entry: Path) -> nn.Module:
    meta = json.loads((entry / "meta.json").read_text())
    model, _, _ = build_architecture(cfg, len(meta["classes"]), load_pretrained=False)
    sd = load_file(str(entry / "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    return model.eval()
