"""Validate: run the artifact on its real runtime with the profile's settings.

Measures val accuracy, top-1 agreement and max abs diff against the PyTorch reference of the
same model, latency p50/p90 after warm-up, and size on disk; then checks every gate and
collects all misses before anything raises. A profile whose runtime/device/arch is missing
here is reported as not run, with the reason, never as passed.
"""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path

import numpy as np

from ..config import Budgets, TargetProfile
from ..metrics import accuracy, agreement, confusion, max_abs_diff
from ..profiles import unavailable_reason
from ..runtimes import open_runner

NAME = "validate"
VERSION = 3  # 2: test-set accuracy; min_accuracy gate. 3: confusion matrices; latency in rounds with the p90 spread

# parity of the artifact with its PyTorch reference: |diff| <= tol * max(1, max|reference|)
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": None}


def artifact_bytes(artifact: Path, profile: TargetProfile) -> int:
    """Size on disk of the artifact's model files (a folder such as .mlpackage counted whole)."""
    from .export import model_files

    total = 0
    for name in model_files(profile):
        p = artifact / name
        files = [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p] if p.is_file() else []
        total += sum(q.stat().st_size for q in files)
    return total


def run(profile: TargetProfile, artifact: Path, precision: str, Xval: np.ndarray, yval: np.ndarray, ref_logits: np.ndarray, progress=None,
        Xtest=None, ytest=None) -> dict:
    """Metrics of the artifact on val (and on test when given: reported and gated, never used to choose)."""
    size = artifact_bytes(artifact, profile)
    reason = unavailable_reason(profile)
    host = {"hostname": socket.gethostname(), "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    if reason:
        return {"status": "not run", "reason": reason, "size_bytes": size, "host": host}
    t0 = time.perf_counter()
    runner = open_runner(profile, artifact, precision)
    logits = runner.run(Xval)
    bench = runner.benchmark(Xval[:1], progress=progress)
    test = {}
    if Xtest is not None and ytest is not None:
        tlogits = runner.run(Xtest)
        test = {"test_accuracy": accuracy(tlogits, ytest), "test_samples": int(len(ytest)),
                "test_confusion": confusion(tlogits, ytest, int(ref_logits.shape[1]) if ref_logits.ndim == 2 else int(np.max(ytest, initial=0)) + 1)}
    return {
        **test,
        "status": "measured",
        "accuracy": accuracy(logits, yval),
        "reference_accuracy": accuracy(ref_logits, yval),
        "agreement": agreement(logits, ref_logits),
        "max_abs_diff": max_abs_diff(logits, ref_logits),
        "confusion": confusion(logits, yval, int(ref_logits.shape[1]) if ref_logits.ndim == 2 else int(np.max(yval, initial=0)) + 1),
        "reference_scale": float(np.max(np.abs(ref_logits))) if ref_logits.size else 0.0,
        "latency_p50_ms": bench["p50_ms"],
        "latency_p90_ms": bench["p90_ms"],
        "throughput_ips": bench["throughput_ips"],
        "benchmark": bench,
        "size_bytes": size,
        "samples": int(len(yval)),
        "settings": runner.settings,
        "host": host,
        "seconds": time.perf_counter() - t0,
    }


def merged_budgets(profile: TargetProfile, build: Budgets) -> dict:
    """The limits that apply (edgebuild/budgets.py: the build file wins unless the profile marks a hard device limit)."""
    from ..budgets import values

    return values(profile, build)


def gates(target: str, precision: str, metrics: dict, budgets: dict, fp32_accuracy: float | None,
          fp32_test_accuracy: float | None = None) -> list[dict]:
    """Every gate with its verdict. ``fp32_accuracy`` is the unquantized reference's accuracy
    (``fp32_test_accuracy`` on the test split); accuracy budgets apply to val and to test."""
    rows = []
    if metrics.get("status") not in ("measured", "emulated"):
        for k, v in budgets.items():
            rows.append({"target": target, "budget": k, "limit": v, "measured": None, "verdict": "not run"})
        return rows
    emulated = metrics["status"] == "emulated"  # correct results under qemu-user, never speed

    def add(name, limit, measured, ok):
        rows.append({"target": target, "budget": name, "limit": limit, "measured": measured, "verdict": "pass" if ok else "FAIL"})

    if "max_latency_ms" in budgets and emulated:
        rows.append({"target": target, "budget": "max_latency_ms (p90)", "limit": budgets["max_latency_ms"], "measured": None,
                     "verdict": "not measured (emulated)"})
    elif "max_latency_ms" in budgets:
        add("max_latency_ms (p90)", budgets["max_latency_ms"], round(metrics["latency_p90_ms"], 3), metrics["latency_p90_ms"] <= budgets["max_latency_ms"])
    if "max_size_mb" in budgets:
        mb = metrics["size_bytes"] / 1e6
        add("max_size_mb", budgets["max_size_mb"], round(mb, 4), mb <= budgets["max_size_mb"])
    if "max_accuracy_drop" in budgets:
        base = fp32_accuracy if fp32_accuracy is not None else metrics["reference_accuracy"]
        drop = base - metrics["accuracy"]
        add("max_accuracy_drop", budgets["max_accuracy_drop"], round(drop, 4), drop <= budgets["max_accuracy_drop"] + 1e-12)
        if "test_accuracy" in metrics and fp32_test_accuracy is not None:
            drop = fp32_test_accuracy - metrics["test_accuracy"]
            add("max_accuracy_drop (test)", budgets["max_accuracy_drop"], round(drop, 4), drop <= budgets["max_accuracy_drop"] + 1e-12)
    if "min_accuracy" in budgets:
        add("min_accuracy", budgets["min_accuracy"], round(metrics["accuracy"], 4), metrics["accuracy"] >= budgets["min_accuracy"] - 1e-12)
        if "test_accuracy" in metrics:
            add("min_accuracy (test)", budgets["min_accuracy"], round(metrics["test_accuracy"], 4), metrics["test_accuracy"] >= budgets["min_accuracy"] - 1e-12)
    if "min_agreement" in budgets:
        add("min_agreement", budgets["min_agreement"], round(metrics["agreement"], 4), metrics["agreement"] >= budgets["min_agreement"])
    tol = PARITY_TOLERANCE.get(precision)
    if tol is not None:
        limit = tol * max(1.0, metrics["reference_scale"])
        add("parity max_abs_diff", round(limit, 6), metrics["max_abs_diff"], metrics["max_abs_diff"] <= limit)
    return rows
