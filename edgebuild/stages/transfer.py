"""Transfer: the pretrained backbone gets a new head for the task's classes and is trained.

Modes: ``finetune`` (all weights; optional head-only warm-up), ``features`` (frozen backbone:
features computed once and cached beside the image store, the head solved as L2 logistic
regression by L-BFGS: head.py), ``scratch`` (same architecture, random init: the baseline).
Training batches are augmented (augment.py; finetune and scratch by default); the model kept
is the best epoch by val accuracy. The test split, when there is one, is scored at the end and
never used to choose anything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from ..lazy import torch, nn, safetensors_torch

from .. import backbones, distributed
from ..config import BuildConfig
from ..augment import Augment
from ..errors import ModelError
from ..head import fit_logistic
from ..metrics import count_macs, count_params
from ..training import fit, load_state, pick_device, predict, seed_everything

NAME = "transfer"
VERSION = 5  # 4: augmentation, optimizer choice, best epoch, L-BFGS head in features mode, test accuracy; 5: TF-style BatchNorm momentum trains as PyTorch's
FEATURE_BATCH = 32  # the feature pass's batch (BENCHMARKS.md: larger batches are not faster on the CPU)
ORT_MIN_IMAGES = 512  # fewer images: exporting the backbone costs more than eager PyTorch loses


def example_input(cfg: BuildConfig) -> torch.Tensor:
    h, w = cfg.preprocess.input_size
    return torch.zeros(1, cfg.preprocess.channels, h, w)


def build_architecture(cfg: BuildConfig, num_classes: int, load_pretrained: bool) -> tuple[nn.Module, str, int]:
    """The backbone with its new head: (model, head module name, feature size)."""
    pretrained = cfg.backbone.pretrained if load_pretrained else False
    model = backbones.factory(cfg.backbone.source, cfg.root, pretrained)()
    if load_pretrained and cfg.backbone.weights:
        backbones.load_weights(model, cfg.resolve(cfg.backbone.weights))
    backbones.drop_auxiliary_heads(model)
    head = backbones.find_head(model, cfg.backbone.classifier)
    seed_everything(cfg.seed)
    feats = backbones.replace_head(model, head, num_classes, example_input(cfg))
    return model.eval(), head, feats


def _feature_engine(fmodel: nn.Module, example: torch.Tensor, device, n_images: int, work: Path):
    """The fastest way to run the frozen backbone here: ``(name, fn(batch) -> features)``.

    On the CPU, with enough images to pay for the export, the backbone exported to ONNX and run
    by ONNX Runtime (about 10x eager PyTorch for MobileNetV2 on 2 cores: BENCHMARKS.md), checked
    against eager on one batch; otherwise (CUDA, few images, export or parity failure) eager
    PyTorch under inference_mode."""
    def eager(xb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return fmodel(torch.as_tensor(xb).to(device)).float().cpu().numpy()

    fmodel.to(device).eval()
    if device.type != "cpu" or n_images < ORT_MIN_IMAGES:
        return f"torch eager (inference_mode, batch {FEATURE_BATCH})", eager
    try:
        import onnxruntime as ort

        from .export import export_onnx

        path = work / "features.onnx"
        export_onnx(fmodel, example, path, opset=18, batch=FEATURE_BATCH)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def onnx(xb: np.ndarray) -> np.ndarray:
            n = len(xb)
            if n < FEATURE_BATCH:
                xb = np.concatenate([xb, np.zeros((FEATURE_BATCH - n,) + xb.shape[1:], np.float32)])
            return np.asarray(sess.run(None, {name: np.ascontiguousarray(xb, dtype=np.float32)})[0])[:n].reshape(n, -1)

        probe = np.random.default_rng(0).standard_normal((FEATURE_BATCH,) + tuple(example.shape[1:])).astype(np.float32)
        ref = eager(probe).reshape(FEATURE_BATCH, -1)
        if np.allclose(onnx(probe), ref, atol=1e-3 * max(1.0, float(np.abs(ref).max()))):
            return f"onnxruntime {ort.__version__} (exported backbone, batch {FEATURE_BATCH})", onnx
    except Exception:  # noqa: BLE001 - any export or runtime problem: eager gives the same features, slower
        pass
    return f"torch eager (inference_mode, batch {FEATURE_BATCH})", eager


def features_pass(fmodel: nn.Module, data, device, cache_dir: Path | None, progress=None, example: torch.Tensor | None = None) -> tuple[dict, str]:
    """The frozen backbone's features of every split ({'train', 'val'[, 'test']}) and the engine
    that computed them; read from ``cache_dir`` when there (a build with the same data,
    preprocessing and backbone made them)."""
    import shutil
    import tempfile

    splits = {"train": data.Xtrain, "val": data.Xval, **({"test": data.Xtest} if getattr(data, "Xtest", None) is not None else {})}
    if cache_dir is not None and all((cache_dir / f"{k}.npy").is_file() for k in splits):
        return {k: np.load(cache_dir / f"{k}.npy") for k in splits}, "cached"
    out = {}
    total = sum(len(x) for x in splits.values())
    work = Path(tempfile.mkdtemp(prefix="edgebuild-features-"))
    try:
        example = example if example is not None else torch.zeros((1,) + tuple(data.Xval.shape[1:]))
        engine, run_batch = _feature_engine(fmodel, example, device, total, work)
        ctx = progress.task(f"transfer (features: backbone pass, {engine})", total) if progress else None
        task = ctx.__enter__() if ctx else None
        done, t0 = 0, time.perf_counter()
        try:
            for k, X in splits.items():
                parts = []
                lo, hi = distributed.shard_bounds(len(X))  # under torchrun each rank computes a shard; all_gather joins them
                for b in range(lo, hi, FEATURE_BATCH):
                    xb = X[b : min(b + FEATURE_BATCH, hi)]
                    parts.append(run_batch(xb))
                    done += len(xb)
                    if task:
                        w = distributed.world_size()
                        rate = done * w / max(time.perf_counter() - t0, 1e-9)
                        task.update(min(done * w, total), f"{rate:.0f} images/s, ETA {(total - done * w) / max(rate, 1e-9):.0f}s")
                local = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
                out[k] = distributed.gather_rows(local, len(X)) if distributed.active() else local
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cache_dir is not None and distributed.is_main():
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=cache_dir.parent))
        for k, v in out.items():
            np.save(tmp / f"{k}.npy", v.astype(np.float32))
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another build wrote the same features first
            shutil.rmtree(tmp, ignore_errors=True)
    return out, engine


def run(cfg: BuildConfig, data, out: Path, progress, features_cache: Path | None = None) -> dict:
    """Train; ``features_cache``: where features mode keeps (and finds) the backbone's features."""
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
    aug_cfg = tc.effective_augment
    augment = Augment(aug_cfg, cfg.preprocess.mean, cfg.preprocess.std, cfg.preprocess.channels, cfg.seed) if aug_cfg else None
    common = dict(batch_size=tc.batch_size, seed=cfg.seed, weight_decay=tc.weight_decay, device=device, progress=progress,
                  optimizer=tc.optimizer, label_smoothing=tc.label_smoothing, patience=tc.patience, augment=augment)
    lr = tc.effective_lr
    best_epoch, feature_engine = None, None
    if tc.mode == "features":
        fmodel, head_mod = backbones.split_features(model, head)
        for p in fmodel.parameters():
            p.requires_grad_(False)
        tf = time.perf_counter()
        fs, feature_engine = features_pass(fmodel, data, device, features_cache, progress, example_input(cfg))
        feature_seconds = time.perf_counter() - tf
        Ftr, Fva = fs["train"], fs["val"]
        check = predict(model, data.Xval[:4], device=device)
        head_out = predict(head_mod, Fva[:4], device=device)
        if Ftr.ndim != 2 or not np.allclose(check, head_out, atol=1e-4):
            raise ModelError(
                f"features mode needs the head '{head}' to be the last layer (model(x) == head(features(x)))",
                hint="use transfer.mode: finetune for this backbone, or name the final layer as backbone.classifier",
            )
        head_mod = head_mod.cpu()
        history = fit_logistic(head_mod, Ftr, data.ytrain, Fva, data.yval, label_smoothing=tc.label_smoothing, progress=progress)
        best_epoch = next(h["epoch"] for h in history if h["selected"])
    else:
        feature_seconds = 0.0
        if tc.mode == "finetune" and tc.warmup_epochs:
            head_params = set(id(p) for p in model.get_submodule(head).parameters())
            for p in model.parameters():
                p.requires_grad_(id(p) in head_params)
            r = fit(model, model.parameters(), data.Xtrain, data.ytrain, data.Xval, data.yval, epochs=tc.warmup_epochs, lr=lr, label="transfer (head warm-up)", **common)
            history += [dict(h, phase="warmup") for h in r.history]
            epoch_seconds += r.epoch_seconds
            fits.append(r)
            for p in model.parameters():
                p.requires_grad_(True)
        r = fit(model, model.parameters(), data.Xtrain, data.ytrain, data.Xval, data.yval, epochs=tc.epochs, lr=lr, label=f"transfer ({tc.mode})", **common)
        history += r.history
        epoch_seconds += r.epoch_seconds
        fits.append(r)
        best_epoch = r.best_epoch
    model = model.cpu().eval()
    from .prune import torch_latency

    host_latency = None
    if distributed.is_main():  # the other ranks only trained along; their latency would disturb rank 0's
        with torch.inference_mode():
            host_latency = torch_latency(model, example=example_input(cfg))[0]
    val_logits = predict(model, data.Xval)
    val_acc = float((val_logits.argmax(1) == data.yval).mean())
    test_acc = None
    if getattr(data, "Xtest", None) is not None:  # scored once, after every choice was made on val
        test_acc = float((predict(model, data.Xtest).argmax(1) == data.ytest).mean()) if len(data.ytest) else 0.0
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
        "test_accuracy": test_acc,
        "chance_accuracy": chance_accuracy(data.yval, len(data.classes)),
        "best_epoch": best_epoch,
        "stopped_early": bool(fits and fits[-1].stopped_early),
        "optimizer": tc.optimizer if tc.mode != "features" else "lbfgs",
        "lr": lr if tc.mode != "features" else None,
        "augment": aug_cfg.model_dump() if aug_cfg and tc.mode != "features" else None,
        "params": count_params(model),
        "macs": count_macs(model, example_input(cfg)),
        "host_latency": host_latency,
        "history": history,
        "seconds": time.perf_counter() - t0,
        "feature_seconds": feature_seconds,
        "feature_engine": feature_engine,
        "epoch_seconds": epoch_seconds,
        "mean_epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def chance_accuracy(y, num_classes: int) -> float:
    """What always answering the most frequent val class scores (at least 1 / classes)."""
    y = np.asarray(y)
    top = float(np.bincount(y, minlength=num_classes).max() / len(y)) if len(y) else 0.0
    return max(top, 1.0 / max(num_classes, 1))


def save_model(model: nn.Module, out: Path) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_model(cfg: BuildConfig, entry: Path) -> nn.Module:
    meta = json.loads((entry / "meta.json").read_text())
    model, _, _ = build_architecture(cfg, len(meta["classes"]), load_pretrained=False)
    sd = safetensors_torch.load_file(str(entry / "model.safetensors"))
    load_state(model, sd)
    return model.eval()
