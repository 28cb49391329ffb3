"""Quantize: int8 post-training quantization with each runtime's own tool.

ONNX Runtime targets: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel int8
weights, uint8 activations, calibration method from the profile). OpenVINO targets:
``nncf.quantize`` on the OpenVINO model. The calibration set is a seeded, class-balanced
subset of the training data through the same preprocessing as everything else.
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
from .export import model_files

NAME = "quantize"
VERSION = 2


def _quiet():
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


def quantize_onnxruntime(src: Path, dst: Path, calib: np.ndarray, profile: TargetProfile, calibration: str | None = None,
                         exclude_nodes: list[str] | None = None) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = calibration or profile.quantization.calibration
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    static = profile.batch if isinstance(profile.batch, int) else None

    class Reader(CalibrationDataReader):
        def __init__(self):
            step = static or 16
            self.batches = []
            for b in range(0, len(calib), step):
                chunk = calib[b : b + step]
                if static and len(chunk) < static:
                    continue
                self.batches.append({"input": np.ascontiguousarray(chunk, dtype=np.float32)})
            self.it = iter(self.batches)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(self.batches)

    pre = dst.with_name("pre.onnx")
    t0 = time.perf_counter()
    try:
        with _quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(dst), Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=profile.quantization.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                nodes_to_exclude=exclude_nodes or [],
            )
    except Exception as e:
        raise ModelError(f"ONNX Runtime quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="try another calibration method in the target profile, or an fp32 target") from e
    finally:
        pre.unlink(missing_ok=True)
    stripped = strip_debug_metadata(dst)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "calibration": method, "stripped_node_metadata": stripped,
            "per_channel": profile.quantization.per_channel, "activations": "uint8", "weights": "int8",
            "excluded_nodes": exclude_nodes or [], "seconds": time.perf_counter() - t0}


DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy")


def strip_debug_metadata(path: Path) -> list[str]:
    """Drop the exporter's per-node debug strings (Python stack traces, FX node dumps) from an
    ONNX file: they do not change what the model computes and are a sizeable part of a small
    int8 file. Returns the keys removed."""
    import onnx

    m = onnx.load(str(path))
    removed = set()
    for node in m.graph.node:
        keep = [p for p in node.metadata_props if p.key not in DEBUG_METADATA]
        if len(keep) != len(node.metadata_props):
            removed |= {p.key for p in node.metadata_props if p.key in DEBUG_METADATA}
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    if removed:
        onnx.save(m, str(path))
    return sorted(removed)


def quantize_openvino(src_xml: Path, dst_xml: Path, calib: np.ndarray, profile: TargetProfile, ignored: list[str] | None = None,
                      preset: str | None = None, accuracy_control: dict | None = None) -> dict:
    import nncf
    import openvino as ov

    static = profile.batch if isinstance(profile.batch, int) else 1
    items = [np.ascontiguousarray(calib[b : b + static], dtype=np.float32) for b in range(0, len(calib) - static + 1, static)]
    t0 = time.perf_counter()
    try:
        with _quiet():
            model = ov.Core().read_model(str(src_xml))
            preset = preset or profile.quantization.preset
            qpreset = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
            kwargs = {}
            if ignored:
                kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
            if accuracy_control:
                ac = accuracy_control
                q = nncf.quantize_with_accuracy_control(
                    model, nncf.Dataset(items), nncf.Dataset(ac["val_items"]), ac["validation_fn"], max_drop=ac["max_drop"],
                    drop_type=nncf.DropType.ABSOLUTE, preset=qpreset, subset_size=len(items), **kwargs)
            else:
                q = nncf.quantize(model, nncf.Dataset(items), preset=qpreset, subset_size=len(items), **kwargs)
            from ..runtimes.openvino import save_model

            save_model(q, dst_xml, compress_to_fp16=False)
    except Exception as e:
        raise ModelError(f"NNCF quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="try preset: mixed in the target profile, or an fp16/fp32 target") from e
    return {"tool": "nncf.quantize_with_accuracy_control" if accuracy_control else "nncf.quantize", "nncf_version": nncf.__version__, "preset": preset,
            "ignored": ignored or [], "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# The accuracy guard: remedies in order, then the profile's fallback; every attempt recorded
# ----------------------------------------------------------------------------------------------


def float_layers(profile: TargetProfile, model_path: Path) -> list[str]:
    """Names of the first convolution and the head (last MatMul/Gemm) in a model file."""
    if profile.runtime == "onnxruntime":
        import onnx

        nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
        first = next((n.name for n in nodes if n.op_type == "Conv"), None)
        last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    else:
        import openvino as ov

        ops = list(ov.Core().read_model(str(model_path)).get_ordered_ops())
        first = next((o.get_friendly_name() for o in ops if o.get_type_name() in ("Convolution", "GroupConvolution")), None)
        last = next((o.get_friendly_name() for o in reversed(ops) if o.get_type_name() == "MatMul"), None)
    return [n for n in (first, last) if n]


def host_profile(profile: TargetProfile) -> TargetProfile:
    """The same runtime and settings on this host's CPU (where the guard measures accuracy)."""
    return profile.model_copy(update={"device": "CPU", "arch": "any"})


def host_accuracy(profile: TargetProfile, artifact: Path, precision: str, X: np.ndarray, y: np.ndarray) -> float:
    from ..runtimes import open_runner

    logits = open_runner(host_profile(profile), artifact, precision).run(X)
    return float((logits.argmax(1) == y).mean()) if len(y) else 0.0


def _attempts_plan(profile: TargetProfile) -> list[tuple[str, dict]]:
    if profile.runtime == "onnxruntime":
        plan = [("plain", {}), ("first conv and head in float", {"float_layers": True})]
        for method in ("entropy", "percentile"):
            if method != profile.quantization.calibration:
                plan.append((f"first conv and head in float, {method} calibration", {"float_layers": True, "calibration": method}))
        return plan
    plan = [("plain", {}), ("first conv and head in float", {"float_layers": True})]
    if profile.quantization.preset != "mixed":
        plan.append(("first conv and head in float, mixed preset (asymmetric activations)", {"float_layers": True, "preset": "mixed"}))
    plan.append(("NNCF accuracy-controlled quantization", {"float_layers": True, "accuracy_control": True}))
    return plan


def _quantize_once(profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
    if profile.runtime == "onnxruntime":
        names = float_layers(profile, src / "model.onnx") if opts.get("float_layers") else None
        return quantize_onnxruntime(src / "model.onnx", dst / "model.onnx", calib, profile, calibration=opts.get("calibration"), exclude_nodes=names)
    names = float_layers(profile, src / "model.xml") if opts.get("float_layers") else None
    return quantize_openvino(src / "model.xml", dst / "model.xml", calib, profile, ignored=names, preset=opts.get("preset"),
                             accuracy_control=ac if opts.get("accuracy_control") else None)


def _fallback(profile: TargetProfile, src: Path, out: Path, precision: str) -> str:
    """Write the fallback artifact into ``out``; returns the precision actually written."""
    import shutil

    if profile.runtime == "openvino" and precision == "fp16":
        import openvino as ov

        from ..runtimes.openvino import save_model

        save_model(ov.Core().read_model(str(src / "model.xml")), out / "model.xml", compress_to_fp16=True)
        return "fp16"
    for f in model_files(profile):
        shutil.copyfile(src / f, out / f)
    return "fp32"


def run(profile: TargetProfile, src: Path, out: Path, calib: np.ndarray, *, Xval: np.ndarray | None = None, yval: np.ndarray | None = None,
        baseline_accuracy: float | None = None, max_accuracy_drop: float | None = None, log=None) -> dict:
    """Quantize ``src`` (the export entry) into ``out``; with a budget, guard its accuracy.

    ``baseline_accuracy`` is what the build's accuracy budget is measured against (the
    transferred fp32 model). Returns quantize.json: every attempt, the decision and the
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
    plan = _attempts_plan(profile) if guard else [("plain", {})]
    ac = None
    if guard and profile.runtime == "openvino":
        static = profile.batch if isinstance(profile.batch, int) else 1
        val_items = [(np.ascontiguousarray(Xval[b : b + static], dtype=np.float32), yval[b : b + static]) for b in range(0, len(Xval) - static + 1, static)]

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
            info = _quantize_once(profile, src, adir, calib, opts, ac)
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
            effective = _fallback(profile, src, out, profile.fallback)
            decision = f"fallback-{effective}"
            acc = host_accuracy(profile, out, effective, Xval, yval)
            note = "" if effective == profile.fallback else f" (fallback {profile.fallback} is not available for {profile.runtime}; fp32 written)"
            attempts.append({"attempt": f"fallback {effective}{note}", "accuracy": acc, "drop": round(base - acc, 6),
                             "within_budget": base - acc <= max_accuracy_drop + 1e-12})
            log(f"  int8 over the accuracy budget after {len(attempts) - 1} attempts; falling back to {effective} as the profile says"
                f" (accuracy {acc:.4f}){note}")
    if decision != f"fallback-{effective}":
        adir = out / f".attempt-{chosen}"
        for f in model_files(profile):
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
