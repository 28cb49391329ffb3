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
import warnings
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from ..runtimes import adapter

NAME = "quantize"
VERSION = 3  # 3: the guard acts on min_agreement too


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


def host_logits(profile: TargetProfile, artifact: Path, precision: str, X: np.ndarray) -> np.ndarray:
    from ..runtimes import open_runner

    return open_runner(host_profile(profile), artifact, precision).run(X)


def host_accuracy(profile: TargetProfile, artifact: Path, precision: str, X: np.ndarray, y: np.ndarray) -> float:
    return float((host_logits(profile, artifact, precision, X).argmax(1) == y).mean()) if len(y) else 0.0


# the accuracy-type gates the guard can improve: how each is measured on an attempt, and how
# an attempt's record is judged against its limit
GUARDED = ("max_accuracy_drop", "min_accuracy", "min_agreement")


def _measure(rec: dict, logits: np.ndarray, y: np.ndarray, ref_pred: np.ndarray | None, base: float) -> None:
    acc = float((logits.argmax(1) == y).mean()) if len(y) else 0.0
    rec.update(accuracy=acc, drop=round(base - acc, 6))
    if ref_pred is not None and len(ref_pred) == len(logits):
        rec["agreement"] = float((logits.argmax(1) == ref_pred).mean()) if len(y) else 1.0


def _float_share(rec: dict, earlier: list[dict]) -> None:
    """The share of quantizers an attempt gave back to float, against the most any of ``earlier``
    kept (accuracy control can revert a model to float and still write an "int8" file)."""
    most = max((a.get("quantizers") or 0 for a in earlier), default=0)
    if rec.get("quantizers") is not None and most:
        rec["float_share"] = round(max(0.0, 1 - rec["quantizers"] / most), 4)


def _within(rec: dict, limits: dict, max_reverted: float = 1.0) -> bool:
    """Every guarded limit met (an attempt that could not be measured meets none), and no more than
    ``max_reverted`` of the quantizers given back to float."""
    if "accuracy" not in rec:
        return False
    ok = rec.get("float_share", 0.0) <= max_reverted + 1e-12
    if "max_accuracy_drop" in limits:
        ok &= rec["drop"] <= limits["max_accuracy_drop"] + 1e-12
    if "min_accuracy" in limits:
        ok &= rec["accuracy"] >= limits["min_accuracy"] - 1e-12
    if "min_agreement" in limits:
        ok &= rec.get("agreement", 0.0) >= limits["min_agreement"] - 1e-12
    return bool(ok)


def _shown(rec: dict, limits: dict) -> str:
    if "accuracy" not in rec:
        return f"failed: {rec.get('error')}"
    parts = [f"accuracy {rec['accuracy']:.4f} (drop {rec['drop']:+.4f}" + (f", budget {limits['max_accuracy_drop']}" if "max_accuracy_drop" in limits else "")
             + (f", min {limits['min_accuracy']})" if "min_accuracy" in limits else ")")]
    if "agreement" in rec:
        parts.append(f"agreement {rec['agreement']:.4f}" + (f" (min {limits['min_agreement']})" if "min_agreement" in limits else ""))
    if "float_share" in rec:
        parts.append(f"{rec['quantizers']} quantizers, {rec['float_share']:.0%} of them back in float")
    return ", ".join(parts)


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
        baseline_accuracy: float | None = None, max_accuracy_drop: float | None = None, min_agreement: float | None = None,
        min_accuracy: float | None = None, ref_logits: np.ndarray | None = None, log=None, qat=None) -> dict:
    """Quantize ``src`` (the export entry) into ``out``; with an accuracy-type budget
    (max_accuracy_drop, min_accuracy, min_agreement), guard it: remedies in order, then the fallback.

    ``baseline_accuracy`` is what the build's accuracy budget is measured against (the
    transferred fp32 model); ``ref_logits`` are the reference model's outputs that top-1
    agreement is measured against. ``qat`` (a :class:`edgebuild.qat.QATJob`) adds quantization-aware
    training after the PTQ remedies, or replaces them with ``method: qat``. Returns quantize.json: every attempt, the decision and the
    effective precision of the artifact left in ``out``.
    """
    import shutil

    from ..profiles import unavailable_reason

    log = log or (lambda msg: None)
    can_measure = Xval is not None and yval is not None and len(yval) > 0
    why_not = unavailable_reason(host_profile(profile)) if can_measure else "no validation data given"
    fp32_logits = host_logits(profile, src, "fp32", Xval) if not why_not else None
    fp32_acc = float((fp32_logits.argmax(1) == yval).mean()) if fp32_logits is not None else None
    base = baseline_accuracy if baseline_accuracy is not None else fp32_acc
    ref_pred = np.asarray(ref_logits).argmax(1) if ref_logits is not None and len(ref_logits) else \
        (fp32_logits.argmax(1) if fp32_logits is not None else None)
    limits = {k: v for k, v in (("max_accuracy_drop", max_accuracy_drop), ("min_accuracy", min_accuracy), ("min_agreement", min_agreement))
              if v is not None}
    if base is None:
        limits.pop("max_accuracy_drop", None)
    guard = bool(limits) and not why_not
    rt = adapter(profile.runtime)
    plan = _attempts_plan(profile, rt, qat) if guard or profile.quantization.method == "qat" else [("plain", {})]
    ac = None
    if guard and rt.accuracy_control:
        static = profile.batch if isinstance(profile.batch, int) else 1
        # NNCF controls one metric's drop: accuracy on the labels, or (agreement budget only)
        # accuracy on the reference model's predictions, which is top-1 agreement
        if "max_accuracy_drop" in limits:
            labels = yval
            own_drop = max(0.0, (base or 0.0) - (fp32_acc or 0.0))
            max_drop = max(0.0, limits["max_accuracy_drop"] - own_drop)
        elif "min_accuracy" in limits:
            labels = yval
            max_drop = max(0.0, (fp32_acc or 0.0) - limits["min_accuracy"])
        else:
            labels = ref_pred
            own = float((fp32_logits.argmax(1) == ref_pred).mean())
            max_drop = max(0.0, own - limits["min_agreement"])
        val_items = _Batches(Xval, labels, static)

        def validation_fn(compiled, items):
            hits = n = 0
            for x, y in items:
                pred = np.asarray(compiled(x)[0]).argmax(1)
                hits += int((pred == y).sum())
                n += len(y)
            return hits / max(n, 1)

        ac = {"val_items": val_items, "validation_fn": validation_fn, "max_drop": max_drop, "log": log}

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
                _measure(rec, host_logits(profile, adir, "int8", Xval), yval, ref_pred, base)
            # against earlier attempts that kept the same layers in float by choice (that remedy is
            # named and bounded; what accuracy control gives back is not)
            _float_share(rec, [a for a, (_, o) in zip(attempts, plan) if bool(o.get("float_layers")) == bool(opts.get("float_layers"))])
            rec["within_budget"] = _within(rec, limits, profile.quantization.max_reverted) if guard else None
        except ModelError as e:
            if not guard:
                raise
            rec.update(error=e.message, within_budget=False)
        attempts.append(rec)
        if guard:
            log(f"  int8 attempt '{what}': {_shown(rec, limits)}")
        if not guard or rec["within_budget"]:
            chosen = i
            break

    decision, effective = "int8", "int8"
    if chosen is None:
        usable = [i for i, a in enumerate(attempts) if "accuracy" in a]
        if profile.fallback == "fail":
            decision = "fail"
            chosen = max(usable, key=lambda i: (attempts[i].get("agreement", 0.0), attempts[i]["accuracy"])
                         if "max_accuracy_drop" not in limits else attempts[i]["accuracy"]) if usable else None
            log(f"  int8 over the accuracy budget ({', '.join(limits)}) after {len(attempts)} attempts; the profile's fallback is 'fail'")
            if chosen is None:
                raise ModelError(f"int8 quantization failed for {profile.name} in every attempt: {attempts[-1].get('error')}",
                                 hint="use an fp32/fp16 target or set fallback: fp32 in the profile")
        else:
            effective = rt.fallback(profile, src, out, profile.fallback)
            decision = f"fallback-{effective}"
            note = "" if effective == profile.fallback else f" (fallback {profile.fallback} is not available for {profile.runtime}; fp32 written)"
            rec = {"attempt": f"fallback {effective}{note}"}
            _measure(rec, host_logits(profile, out, effective, Xval), yval, ref_pred, base)
            rec["within_budget"] = _within(rec, limits)
            attempts.append(rec)
            log(f"  int8 over the accuracy budget ({', '.join(limits)}) after {len(attempts) - 1} attempts; falling back to {effective}"
                f" as the profile says ({_shown(rec, limits)}){note}")
    if decision != f"fallback-{effective}":
        adir = out / f".attempt-{chosen}"
        for f in rt.artifact_files(profile):
            os.replace(adir / f, out / f)
    for d in out.glob(".attempt-*"):
        shutil.rmtree(d, ignore_errors=True)

    final = attempts[chosen] if decision != f"fallback-{effective}" else attempts[-1]
    meta = {k: v for k, v in final.items() if k not in ("attempt", "accuracy", "drop", "agreement", "within_budget", "error")}
    meta.update({
        "requested_precision": "int8",
        "effective_precision": effective,
        "decision": decision,
        "chosen": final["attempt"],
        "accuracy": final.get("accuracy"),
        "agreement": final.get("agreement"),
        "fp32_accuracy": fp32_acc,
        "guard": {**limits, "max_accuracy_drop": limits.get("max_accuracy_drop"), "baseline_accuracy": base, "measured_on": "host CPU, validation set"}
                 if guard else {"status": "not run", "reason": why_not or "no max_accuracy_drop, min_accuracy or min_agreement budget"},
        "attempts": attempts,
        "fallback": profile.fallback,
    })
    return meta


def guard_gate_rows(target: str, meta: dict) -> list[dict]:
    """A failed guard with fallback 'fail' is a failed gate (exit 3), even where validation cannot run."""
    if meta.get("decision") != "fail":
        return []
    g = meta.get("guard", {})
    rows = []
    if g.get("max_accuracy_drop") is not None:
        rows.append({"target": target, "budget": "int8 accuracy guard (max_accuracy_drop, fallback: fail)", "limit": g.get("max_accuracy_drop"),
                     "measured": round(g.get("baseline_accuracy", 0) - (meta.get("accuracy") or 0), 4),
                     "verdict": "FAIL" if g.get("baseline_accuracy", 0) - (meta.get("accuracy") or 0) > g["max_accuracy_drop"] + 1e-12 else "pass"})
    if g.get("min_accuracy") is not None:
        acc = meta.get("accuracy")
        rows.append({"target": target, "budget": "int8 accuracy guard (min_accuracy, fallback: fail)", "limit": g["min_accuracy"],
                     "measured": round(acc, 4) if acc is not None else None,
                     "verdict": "FAIL" if acc is None or acc < g["min_accuracy"] - 1e-12 else "pass"})
    if g.get("min_agreement") is not None:
        agreement = meta.get("agreement")
        rows.append({"target": target, "budget": "int8 accuracy guard (min_agreement, fallback: fail)", "limit": g["min_agreement"],
                     "measured": round(agreement, 4) if agreement is not None else None,
                     "verdict": "FAIL" if agreement is None or agreement < g["min_agreement"] - 1e-12 else "pass"})
    return rows
