"""Distill: the transferred model teaches a smaller student of any architecture.

``compress.distill.student`` is a backbone source (``python:``, ``hf:``, ``timm:``,
``torchvision:``); the student gets a head for the task's classes and starts from random
weights or from ``student_weights``. It trains on the transfer stage's data with the same
training loop (and so the same augmentation) as transfer, against soft targets from the
teacher (KL at ``temperature``, weighted by ``alpha``) plus the hard labels. Pruning,
quantization and the search then start from the student as from any model.

The entry holds the student like a transfer entry (``model.safetensors``, ``val_logits.npy``,
``meta.json``) plus the teacher's figures beside the student's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from ..lazy import torch, nn

from .. import distributed
from ..augment import Augment
from ..config import BackboneConfig, BuildConfig
from ..metrics import count_macs, count_params
from ..training import fit, pick_device, predict, seed_everything
from . import transfer as transfer_stage

NAME = "distill"
VERSION = 2  # 2: TF-style BatchNorm momentum trains as PyTorch's


def enabled(cfg: BuildConfig) -> bool:
    return cfg.compress.distill is not None and cfg.compress.distill.student is not None


def student_config(cfg: BuildConfig) -> BuildConfig:
    """The build file with the student as its backbone (to build and load the student's
    architecture with the transfer stage's code). The build file itself when there is no student."""
    if not enabled(cfg):
        return cfg
    dc = cfg.compress.distill
    bb = BackboneConfig(source=dc.student, weights=dc.student_weights, classifier=dc.student_classifier)
    scfg = cfg.model_copy(update={"backbone": bb})
    scfg.path = cfg.path
    return scfg


def params(cfg: BuildConfig) -> dict:
    dc, tc = cfg.compress.distill, cfg.transfer
    return {"student": dc.student, "classifier": dc.student_classifier, "temperature": dc.temperature, "alpha": dc.alpha,
            "epochs": dc.epochs if dc.epochs is not None else tc.epochs, "lr": dc.lr if dc.lr is not None else tc.effective_lr,
            "transfer": tc.model_dump(), "preprocess": cfg.preprocess.model_dump(), "seed": cfg.seed}


def inputs(build, teacher_key: str) -> dict:
    """What keys the step besides its params: the student's code/weights, the teacher, the data."""
    from ..stages.bundle import pkg_version

    return {**build._backbone_inputs(student_config(build.cfg)), "teacher": teacher_key, "data": build.data().fingerprint,
            "torch": pkg_version("torch")}


def in_build(build, by: dict, tstep, tdir: Path, tmeta: dict, models: dict, example: torch.Tensor):
    """Run (or reuse) the build's distill step; registers the student in ``models``."""
    dstep = by[(NAME, "")]
    ddir = build._stage(dstep, lambda out: run(build.cfg, build.data(), build._torch_model(tstep, tdir), tmeta, out, build.progress, example),
                        shared=True)
    if not distributed.is_main():
        return dstep, ddir, tmeta
    dmeta = json.loads((ddir / "meta.json").read_text())
    models[dstep.key] = {"step": dstep, "dir": ddir, "meta": dmeta, "ref_logits": np.load(ddir / "val_logits.npy")}
    return dstep, ddir, dmeta


def run(cfg: BuildConfig, data, teacher: nn.Module, tmeta: dict, out: Path, progress, example: torch.Tensor) -> dict:
    p = params(cfg)
    scfg = student_config(cfg)
    tc = cfg.transfer
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    student, head, feats = transfer_stage.build_architecture(scfg, len(data.classes), load_pretrained=True)
    init = "weights " + Path(scfg.backbone.weights).name if scfg.backbone.weights else "random"
    teacher = teacher.cpu().eval()
    seed_everything(cfg.seed)
    aug = tc.effective_augment  # the transfer stage's augmentation and optimizer
    augment = Augment(aug, cfg.preprocess.mean, cfg.preprocess.std, cfg.preprocess.channels, cfg.seed) if aug else None
    r = fit(student, student.parameters(), data.Xtrain, data.ytrain, data.Xval, data.yval, epochs=p["epochs"], lr=p["lr"],
            batch_size=tc.batch_size, seed=cfg.seed, weight_decay=tc.weight_decay, device=pick_device(tc.device), progress=progress,
            optimizer=tc.optimizer, label_smoothing=tc.label_smoothing, patience=tc.patience, augment=augment,
            label=f"distill into student {cfg.compress.distill.student} ({init} init)", teacher=teacher,
            temperature=p["temperature"], alpha=p["alpha"])
    if not distributed.is_main():
        return {}
    student = student.cpu().eval()
    val_logits = predict(student, data.Xval)
    from .prune import torch_latency

    lat_teacher, lat_student = torch_latency(teacher, student, example=example)
    transfer_stage.save_model(student, out)
    np.save(out / "val_logits.npy", val_logits.astype(np.float32))
    meta = {
        "student": cfg.compress.distill.student,
        "init": init,
        "head": head,
        "features": feats,
        "classes": list(data.classes),
        "val_accuracy": float((val_logits.argmax(1) == data.yval).mean()) if len(data.yval) else 0.0,
        "params": count_params(student),
        "macs": count_macs(student, example),
        "host_latency": lat_student,
        "teacher": {"source": cfg.backbone.source, "val_accuracy": tmeta["val_accuracy"], "params": tmeta["params"],
                    "macs": tmeta["macs"], "host_latency": lat_teacher},
        "loss": {"temperature": p["temperature"], "alpha": p["alpha"]},
        "epochs": p["epochs"],
        "lr": p["lr"],
        "history": r.history,
        "seconds": time.perf_counter() - t0,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_model(cfg: BuildConfig, entry: Path) -> nn.Module:
    return transfer_stage.load_model(student_config(cfg), entry)


def side_by_side(dmeta: dict) -> dict:
    """Teacher and student figures for the report and the manifest."""
    t = dmeta["teacher"]
    row = lambda src, m, lat: {"source": src, "val_accuracy": m["val_accuracy"], "params": m["params"], "macs": m["macs"],  # noqa: E731
                               "host_latency_p50_ms": (lat or {}).get("p50_ms"), "host_latency_p90_ms": (lat or {}).get("p90_ms")}
    return {"teacher": row(t["source"], t, t.get("host_latency")),
            "student": {**row(dmeta["student"], dmeta, dmeta.get("host_latency")), "init": dmeta.get("init")},
            "loss": dmeta.get("loss"), "epochs": dmeta.get("epochs")}
