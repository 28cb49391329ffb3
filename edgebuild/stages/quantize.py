"""Quantize: int8 post-training quantization with each runtime's own tool, under one accuracy guard.

The tools live in the runtime adapters (``edgebuild.runtimes``): ONNX Runtime's
``quantize_static`` (QDQ), NNCF for OpenVINO, and the optional runtimes' own quantizers. This
stage runs the adapter's attempts in order until one is within the accuracy budget, then the
profile's fallback. The calibration set is a seeded, class-balanced subset of the training
data through the same preprocessing as everything else.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from ..runtimes import adapter

NAME = "quantize"
VERSION = 2


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    for name in ("nncf", "onnxruntime", "root"):
        lg = logging.getLogger(name if name != "root" else None)
        old = lg.level
        lg.setLevel(logging.ERROR)
        stack.callback(lg.setLevel, old)
    return stack


# ----------------------------------------------------------------------------------------------
# The accuracy guard: remedies in order, then the profile's fallback; every attempt recorded
# ----------------------------------------------------------------------------------------------


def host_profile(profile: TargetProfile) -> TargetProfile:
    """The same runtime and settings on this host's CPU (where the guard measures accuracy)."""
    return profile.model_copy(update={"device": "CPU", "arch": "any"})


def host_accuracy(profile: TargetProfile, artifact: Path, precision: str, X: np.ndarray, y: np.ndarray) -> float:
    from ..runtimes import open_runner

    logits = open_runner(host_profile(profile), artifact, precision).run(X)
    return float((logits.argmax(1) == y).mean()) if len(y) else 0.0


def _attempts_plan(profile: TargetProfile, rt, qat=None) -> list[tuple[str, dict]]:
    """The runtime's PTQ remedies in order, then quantization-aware training where the build can
    train (``qat``, a :class:`edgebuild.qat.QATJob`); ``method: qat`` in the profile asks for QAT only."""
    if profile.quantization.method == "qat":
        if qat is None:
            raise ModelError(f"{profile.name}: quantization method 'qat' needs the PyTorch model and training data",
                             hint="build through edgebuild build, or use method: static")
        return [(qat.label(), {"qat": True})]
    return rt.quantize_plan(profile) + ([(qat.label(), {"qat": True})] if qat is not None else [])


class _Batches:
    """(inputs, labels) in batches of ``static``, read when iterated (val stays on disk)."""

    def __init__(self, X, y, static: int):
        self.X, self.y, self.static = X, y, static

    def __len__(self) -> int:
        return len(self.X) // self.static

    def __iter__(self):
        for b in range(0, len(self.X) - self.static + 1, self.static):
            yield np.ascontiguousarray(self.X[b : b + self.static], dtype=np.float32), self.y[b : b + self.static]


def run(profile: TargetProfile, src: Path, out: Path, calib: np.ndarray, *, Xval: np.ndarray | None = None, yval: np.ndarray | None = None,
        baseline_accuracy: float | None = None, max_accuracy_drop: float | None = None, log=None, qat=None) -> dict:
    """Quantize ``src`` (the export entry) into ``out``; with a budget, guard its accuracy.

    ``baseline_accuracy`` is what the build's accuracy budget is measured against (the
    transferred fp32 model). ``qat`` (a :class:`edgebuild.qat.QATJob`) adds quantization-aware
    training after the PTQ remedies, or replaces them with ``method: qat``. Returns quantize.json: every attempt, the decision and the
    effective precision of the artifact left in ``out``.
    """
    import shutil

    from ..profiles import unavailable_reason

    log = log or (lambda msg: None)
    can_measure = Xval is not None and yval is not None and len(yval) > 0
    why_not = unavailable_reason(host_profile(profile)) if can_measure else "no validation data given"
    guard = max_accuracy_drop is not None and baseline_accuracy is not None and not why_not
    fp32_acc = host_accuracy(profile, src, "fp32", Xval, yval) if not why_not else None
    base = baseline_accuracy if baseline_accuracy is not None else fp32_acc
    rt = adapter(profile.runtime)
    plan = _attempts_plan(profile, rt, qat) if guard or profile.quantization.method == "qat" else [("plain", {})]
    ac = None
    if guard and rt.accuracy_control:
        static = profile.batch if isinstance(profile.batch, int) else 1
        val_items = _Batches(Xval, yval, static)

        def validation_fn(compiled, items):
            hits = n = 0
            for x, y in items:
                pred = np.asarray(compiled(x)[0]).argmax(1)
                hits += int((pred == y).sum())
                n += len(y)
            return hits / max(n, 1)

        own_drop = max(0.0, (base or 0.0) - (fp32_acc or 0.0))
        ac = {"val_items": val_items, "validation_fn": validation_fn, "max_drop": max(0.0, max_accuracy_drop - own_drop)}

    attempts: list[dict] = []
    chosen = None
    for i, (what, opts) in enumerate(plan):
        adir = out / f".attempt-{i}"
        adir.mkdir()
        rec = {"attempt": what}
        try:
            info = qat.run(profile, adir, calib) if opts.get("qat") else rt.quantize(profile, src, adir, calib, opts, ac)
            rec.update({k: v for k, v in info.items() if k != "seconds"}, seconds=round(info["seconds"], 3))
            if not why_not:
                acc = host_accuracy(profile, adir, "int8", Xval, yval)
                rec.update(accuracy=acc, drop=round(base - acc, 6))
            rec["within_budget"] = (rec["drop"] <= max_accuracy_drop + 1e-12) if guard else None
        except ModelError as e:
            if not guard:
                raise
            rec.update(error=e.message, within_budget=False)
        attempts.append(rec)
        if guard:
            log(f"  int8 attempt '{what}': " + (f"accuracy {rec['accuracy']:.4f} (drop {rec['drop']:+.4f}, budget {max_accuracy_drop})" if "accuracy" in rec else f"failed: {rec.get('error')}"))
        if not guard or rec["within_budget"]:
            chosen = i
            break

    decision, effective = "int8", "int8"
    if chosen is None:
        usable = [i for i, a in enumerate(attempts) if "accuracy" in a]
        if profile.fallback == "fail":
            decision = "fail"
            chosen = max(usable, key=lambda i: attempts[i]["accuracy"]) if usable else None
            log(f"  int8 over the accuracy budget after {len(attempts)} attempts; the profile's fallback is 'fail'")
            if chosen is None:
                raise ModelError(f"int8 quantization failed for {profile.name} in every attempt: {attempts[-1].get('error')}",
                                 hint="use an fp32/fp16 target or set fallback: fp32 in the profile")
        else:
            effective = rt.fallback(profile, src, out, profile.fallback)
            decision = f"fallback-{effective}"
            acc = host_accuracy(profile, out, effective, Xval, yval)
            note = "" if effective == profile.fallback else f" (fallback {profile.fallback} is not available for {profile.runtime}; fp32 written)"
            attempts.append({"attempt": f"fallback {effective}{note}", "accuracy": acc, "drop": round(base - acc, 6),
                             "within_budget": base - acc <= max_accuracy_drop + 1e-12})
            log(f"  int8 over the accuracy budget after {len(attempts) - 1} attempts; falling back to {effective} as the profile says"
                f" (accuracy {acc:.4f}){note}")
    if decision != f"fallback-{effective}":
        adir = out / f".attempt-{chosen}"
        for f in rt.artifact_files(profile):
            os.replace(adir / f, out / f)
    for d in out.glob(".attempt-*"):
        shutil.rmtree(d, ignore_errors=True)

    final = attempts[chosen] if decision != f"fallback-{effective}" else attempts[-1]
    meta = {k: v for k, v in final.items() if k not in ("attempt", "accuracy", "drop", "within_budget", "error")}
    meta.update({
        "requested_precision": "int8",
        "effective_precision": effective,
        "decision": decision,
        "chosen": final["attempt"],
        "accuracy": final.get("accuracy"),
        "fp32_accuracy": fp32_acc,
        "guard": {"max_accuracy_drop": max_accuracy_drop, "baseline_accuracy": base, "measured_on": "host CPU, validation set"}
                 if guard else {"status": "not run", "reason": why_not or "no max_accuracy_drop budget"},
        "attempts": attempts,
        "fallback": profile.fallback,
    })
    return meta


def guard_gate_rows(target: str, meta: dict) -> list[dict]:
    """A failed guard with fallback 'fail' is a failed gate (exit 3), even where validation cannot run."""
    if meta.get("decision") != "fail":
        return []
    g = meta.get("guard", {})
    return [{"target": target, "budget": "int8 accuracy guard (max_accuracy_drop, fallback: fail)", "limit": g.get("max_accuracy_drop"),
             "measured": round(g.get("baseline_accuracy", 0) - (meta.get("accuracy") or 0), 4), "verdict": "FAIL"}]
