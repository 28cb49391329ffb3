"""Prune: structured channel pruning through Torch-Pruning's dependency graph, then recovery.

The Torch-Pruning glue (tracing, importance, the pruning step, naming a failing layer) lives in
``edgebuild.pruning``; its public names stay importable from here.

Channels are physically removed (convolutions, batch norms, linears and everything coupled to
them: residual additions, depthwise groups, concatenations), so the pruned model is smaller
and faster on every runtime, not just sparse. The new head is never pruned (its input
features are, with the layer feeding it); ``keep`` names more layers to leave whole; channel
counts are rounded to multiples of the target profile's ``align``.

Recovery fine-tunes the pruned model, distilling from the unpruned transferred model when
``compress.distill`` is set (plain cross-entropy otherwise).

Saving: the weights go to ``model.safetensors`` and the pruned layer shapes (plain numbers:
``out_channels``, ``num_features``, ``in_features``...) to ``structure.json``; loading builds a
fresh architecture, applies those shapes and loads the tensors. Nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ..lazy import torch, nn, no_grad, safetensors_torch

from ..config import BuildConfig, PruneConfig
from ..errors import ModelError
from ..metrics import count_macs, count_params
from .. import distributed
from ..pruning import IMPORTANCES, SCOPES, check_forward, prune_model, recalibrate_bn, resolve_layers  # noqa: F401 - public names of this stage
from ..training import fit, load_state, pick_device, predict, seed_everything

NAME = "prune"
RECALIBRATION_SAMPLES = 256
VERSION = 6  # 3: recover_epochs defaults to half the transfer epochs; best recovery epoch kept; 4: BatchNorm recalibrated after pruning; 5: TF-style BatchNorm momentum; 6: attention blocks and layers Torch-Pruning fails on kept whole


# ----------------------------------------------------------------------------------------------
# Saving and loading a pruned model (safetensors + plain-number structure, no pickle)
# ----------------------------------------------------------------------------------------------

_PRIMITIVE = (int, float, bool, str, type(None))


def _attrs(m: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PRIMITIVE) or (isinstance(v, (tuple, list)) and all(isinstance(i, _PRIMITIVE) for i in v)):
            out[k] = v
    return out


def structure(pruned: nn.Module, original: nn.Module) -> dict[str, dict]:
    """Per module, the plain attributes the pruning changed (e.g. Conv2d.out_channels)."""
    orig = dict(original.named_modules())
    out = {}
    for name, m in pruned.named_modules():
        o = orig.get(name)
        if o is None:
            raise ModelError(f"pruned model has a module '{name}' the original lacks", hint="report this as a bug")
        a, b = _attrs(m), _attrs(o)
        diff = {k: (list(v) if isinstance(v, tuple) else v) for k, v in a.items() if b.get(k) != v}
        if diff:
            out[name] = diff
    return out


def save_pruned(model: nn.Module, original: nn.Module, out: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "pruned": "1"})
    (out / "structure.json").write_text(json.dumps(structure(model, original), indent=1, sort_keys=True))


def apply_structure(model: nn.Module, struct: dict[str, dict], state: dict[str, torch.Tensor]) -> nn.Module:
    """Give a fresh model the pruned shapes: attributes from ``struct``, tensors from ``state``."""
    modules = dict(model.named_modules())
    for name, attrs in struct.items():
        m = modules.get(name)
        if m is None:
            raise ModelError(f"pruned model structure names a layer '{name}' the architecture lacks", hint="rebuild with --force")
        for k, v in attrs.items():
            cur = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)
    for mname, m in modules.items():
        prefix = f"{mname}." if mname else ""
        for pname, p in list(m._parameters.items()):
            t = state.get(prefix + pname)
            if p is not None and t is not None and tuple(t.shape) != tuple(p.shape):
                m._parameters[pname] = nn.Parameter(torch.empty_like(t), requires_grad=p.requires_grad)
        for bname, b in list(m._buffers.items()):
            t = state.get(prefix + bname)
            if b is not None and t is not None and tuple(t.shape) != tuple(b.shape):
                m._buffers[bname] = torch.empty_like(t)
    load_state(model, state)
    return model.eval()


def load_pruned(fresh: nn.Module, entry: Path) -> nn.Module:
    state = safetensors_torch.load_file(str(entry / "model.safetensors"))
    struct = json.loads((entry / "structure.json").read_text())
    return apply_structure(fresh, struct, state)


def with_prune(cfg: BuildConfig, pc: PruneConfig) -> BuildConfig:
    """The build file with another prune setting (the search's candidates, per target)."""
    out = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"prune": pc})})
    out.path = cfg.path
    return out


def load_model(cfg: BuildConfig, entry: Path) -> nn.Module:
    from . import transfer as transfer_stage

    meta = json.loads((entry / "meta.json").read_text())
    model, _, _ = transfer_stage.build_architecture(cfg, len(meta["classes"]), load_pretrained=False)
    return load_pruned(model, entry)


# ----------------------------------------------------------------------------------------------
# Host figures
# ----------------------------------------------------------------------------------------------


@no_grad
def torch_latency(*models: nn.Module, example: torch.Tensor, rounds: int = 7, iters: int = 10, warmup: int = 5) -> list[dict]:
    """Batch-1 PyTorch latency on this host's CPU (p50/p90 ms) of each model, measured in
    interleaved rounds so that models compared with each other see the same host load.
    One intra-op thread: multi-threaded OpenMP barriers make batch-1 timings of small models
    swing by 100x on a busy host."""
    x = torch.randn((1,) + tuple(example.shape[1:]), generator=torch.Generator().manual_seed(0))
    models = [m.cpu().eval() for m in models]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _interleaved(models, x, rounds, iters, warmup)
    finally:
        torch.set_num_threads(old_threads)


def _interleaved(models, x, rounds, iters, warmup) -> list[dict]:
    for m in models:
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, m in enumerate(models):
            for _ in range(iters):
                t0 = time.perf_counter()
                m(x)
                times[i].append((time.perf_counter() - t0) * 1000.0)
    return [{"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "iterations": len(t),
             "runtime": f"torch {torch.__version__} cpu", "threads": 1} for t in times]


def model_figures(model: nn.Module, example: torch.Tensor, Xval: np.ndarray, yval: np.ndarray, logits: Optional[np.ndarray] = None) -> dict:
    logits = predict(model, Xval) if logits is None else logits
    return {"val_accuracy": float((logits.argmax(1) == yval).mean()) if len(yval) else 0.0,
            "params": count_params(model), "macs": count_macs(model, example)}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def run(cfg: BuildConfig, data, teacher: nn.Module, tmeta: dict, align: int, out: Path, progress, example: torch.Tensor) -> dict:
    pc: PruneConfig = cfg.compress.prune
    dc = cfg.compress.distill
    tc = cfg.transfer
    t0 = time.perf_counter()
    teacher = teacher.cpu().eval()
    seed_everything(cfg.seed)
    student = copy.deepcopy(teacher)
    before = model_figures(teacher, example, data.Xval, data.yval)
    info = prune_model(student, example, ratio=pc.ratio, importance=pc.importance, scope=pc.scope, keep=pc.keep,
                       head=tmeta.get("head"), align=align, grad_data=(data.Xtrain, data.ytrain), batch_size=min(tc.batch_size, 64),
                       ratio_dict=pc.stage_ratios)
    warnings_ = []
    if info.get("kept_automatically"):
        auto = info["kept_automatically"]
        progress.log(f"  kept whole: {len(auto)} layers Torch-Pruning cannot prune in this model (attention blocks, or a try failed there): {', '.join(auto)}")
        warnings_.append(f"pruning kept {len(auto)} layers whole that Torch-Pruning cannot prune in this architecture ({', '.join(auto[:4])}"
                         f"{', ...' if len(auto) > 4 else ''}); the manifest's compression.kept_automatically lists them")
    rows = np.sort(np.random.default_rng(cfg.seed).permutation(len(data.ytrain))[:RECALIBRATION_SAMPLES])
    recalibrate_bn(student, data.Xtrain[rows])  # the unpruned network's statistics no longer fit
    after = model_figures(student, example, data.Xval, data.yval)
    progress.log(f"  pruned {pc.ratio:.0%} ({pc.importance}, {pc.scope}, align {align}): params {before['params']} -> {after['params']}, "
                 f"MACs {before['macs']} -> {after['macs']}, val acc {before['val_accuracy']:.4f} -> {after['val_accuracy']:.4f} "
                 f"(BatchNorm recalibrated on {len(rows)} training images)")
    lr = pc.lr if pc.lr is not None else tc.effective_lr
    recover_epochs = pc.effective_recover_epochs(tc.epochs)
    if recover_epochs == 0:
        warnings_.append(f"compress.prune.recover_epochs is 0: the pruned model is not retrained; its val accuracy right after pruning is "
                         f"{after['val_accuracy']:.4f} (before pruning: {before['val_accuracy']:.4f})")
    seed_everything(cfg.seed)
    distill = dc is not None and dc.alpha > 0
    r = fit(student, student.parameters(), data.Xtrain, data.ytrain, data.Xval, data.yval, epochs=recover_epochs, lr=lr, optimizer=tc.optimizer,
            batch_size=tc.batch_size, seed=cfg.seed, weight_decay=tc.weight_decay, progress=progress, device=pick_device(tc.device),
            label="prune recovery" + (" (distilling from the unpruned model)" if distill else " (cross-entropy)"),
            teacher=teacher if distill else None,
            temperature=dc.temperature if dc else 4.0, alpha=dc.alpha if dc else 0.0)
    if not distributed.is_main():
        return {}  # under torchrun this rank only joined the recovery training; rank 0 measures and saves
    student = student.cpu().eval()
    val_logits = predict(student, data.Xval)
    recovered = model_figures(student, example, data.Xval, data.yval, val_logits)
    lat_before, lat_after = torch_latency(teacher, student, example=example)
    save_pruned(student, teacher, out)
    np.save(out / "val_logits.npy", val_logits.astype(np.float32))
    meta = {
        **info,
        "head": tmeta.get("head"),
        "classes": list(tmeta.get("classes", data.classes)),
        "recover_epochs": recover_epochs,
        "warnings": warnings_,
        "recovery": {"loss": "distillation" if distill else "cross-entropy", "lr": lr,
                     **({"temperature": dc.temperature, "alpha": dc.alpha} if distill else {})},
        "accuracy_before": before["val_accuracy"],
        "accuracy_after_prune": after["val_accuracy"],
        "accuracy_recovered": recovered["val_accuracy"],
        "val_accuracy": recovered["val_accuracy"],
        "params_before": before["params"],
        "params": recovered["params"],
        "macs_before": before["macs"],
        "macs": recovered["macs"],
        "macs_ratio": recovered["macs"] / before["macs"] if before["macs"] else None,
        "params_ratio": recovered["params"] / before["params"] if before["params"] else None,
        "bytes": (out / "model.safetensors").stat().st_size,
        "host_latency": lat_after,
        "host_latency_before": lat_before,
        "history": r.history,
        "seconds": time.perf_counter() - t0,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
