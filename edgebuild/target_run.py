"""The per-target half of a build: export, quantize, validate and stage the bundle of one
target profile, through the build's cache. Called by :meth:`pipeline.Build.run` once per target
after the shared stages (transfer, prune) are done."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import budgets as budgets_mod
from . import manifest as manifest_mod
from . import qat as qat_mod
from .config import TargetProfile
from .errors import EdgebuildError
from .profiles import unavailable_reason
from .runtimes import adapter, open_runner
from .stages import bundle as bundle_stage
from .stages import export as export_stage
from .stages import quantize as quantize_stage
from .stages import transfer as transfer_stage
from .stages import validate as validate_stage

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Build


@dataclass
class TargetResult:
    report: dict  # report.json's targets[NAME]
    gates: list[dict]
    stage_row: dict  # the "artifact" row of "what each stage bought"
    bundle_name: str


def build_target(b: "Build", name: str, prof: TargetProfile, by: dict, models: dict, example: Any, tmeta: dict,
                 fp32_acc: float, calib_idx: np.ndarray, staging: Path) -> TargetResult:
    cfg, data = b.target_cfg(name), b.data_for(name)  # at the input size the search chose for this target
    if name in b.size_for and example is not None:
        example = transfer_stage.example_input(cfg)
    estep = by[("export", name)]
    src = models[estep.inputs["model"]]
    mstep, mdir, mmeta, mref = src["step"], src["dir"], src["meta"], src["ref_logits"]

    def do_export(out):
        meta = export_stage.run(b._torch_model(mstep, mdir), example, prof, out)
        (out / "meta.json").write_text(json.dumps(meta))
    edir = b._stage(estep, do_export)
    artifact, precision_meta = edir, {}
    limits = budgets_mod.resolve(prof, cfg.budgets)
    budgets = {k: v["value"] for k, v in limits.items()}
    if prof.precision == "int8":
        qstep = by[("quantize", name)]
        calib = data.Xtrain[calib_idx]

        def do_quant(out):
            qat = qat_mod.job(qstep.params.get("qat"), lambda: b._torch_model(mstep, mdir), example, data, b.cache.root, b.progress)
            meta = quantize_stage.run(prof, edir, out, calib, Xval=data.Xval, yval=data.yval, baseline_accuracy=fp32_acc,
                                      max_accuracy_drop=qstep.params["max_accuracy_drop"], min_agreement=qstep.params.get("min_agreement"),
                                      min_accuracy=qstep.params.get("min_accuracy"),
                                      ref_logits=mref, log=b.progress.log, qat=qat)
            (out / "quantize.json").write_text(json.dumps(meta))
        artifact = b._stage(qstep, do_quant)
        precision_meta = json.loads((artifact / "quantize.json").read_text())
        if precision_meta.get("decision", "int8") != "int8":
            b.progress.log(f"  {name}: int8 over the accuracy budget; the bundle ships {precision_meta['effective_precision']} "
                           f"(profile fallback: {prof.fallback}); see manifest model.quantization.attempts")
    effective = precision_meta.get("effective_precision", prof.precision)
    eprof = prof if effective == prof.precision else prof.model_copy(update={"precision": effective})
    vstep = by[("validate", name)]
    golden = bundle_stage.golden_indices(data.yval)

    def do_validate(out):
        m = validate_stage.run(eprof, artifact, eprof.precision, data.Xval, data.yval, mref, b.progress, Xtest=data.Xtest, ytest=data.ytest)
        m["opset"] = export_stage.opset_of(artifact, edir)
        outputs, source = golden_outputs(eprof, artifact, data.Xval[golden], mref[golden])
        if b.emulate and m["status"] == "not run" and not vstep.params.get("emulate") and prof.arch == "aarch64":
            m["reason"] += f"; --emulate covers only runtimes with aarch64 Linux wheels in the root (onnxruntime, litert), not {prof.runtime}"
        if vstep.params.get("emulate") and m["status"] == "not run":
            m = _emulated(b, name, prof, eprof, artifact, m, outputs, golden, out, tmeta, precision_meta, calib_idx, mmeta, effective, mref)
        (out / "metrics.json").write_text(json.dumps(m, indent=2))
        np.save(out / "golden_outputs.npy", outputs)
        (out / "golden_source.txt").write_text(source)
    vdir = b._stage(vstep, do_validate)
    metrics = json.loads((vdir / "metrics.json").read_text())
    rows = budgets_mod.annotate(validate_stage.gates(name, effective, metrics, budgets, fp32_acc, tmeta.get("test_accuracy")) + quantize_stage.guard_gate_rows(name, precision_meta), limits)
    bundle_name = f"{cfg.name}-{name}"
    bdir = staging / bundle_name
    bdir.mkdir()
    manifest = manifest_mod.build_manifest(cfg, prof, metrics, tmeta, precision_meta, data, calib_idx, rows, mmeta=mmeta, effective=effective,
                                           reproducible=b.reproducible)
    # what was produced, not what was asked (recorded by validate: reading it needs onnx)
    manifest["model"]["opset"] = metrics["opset"] if "opset" in metrics else export_stage.opset_of(artifact, edir)
    if getattr(b, "distillation", None):  # the bundle's model is a student: say whose
        manifest["distillation"] = b.distillation
    g = next((g for g in ((b.search or {}).get("groups") or []) if name in g["targets"]), None) if getattr(b, "search", None) else None
    if g is not None and g.get("chosen") is not None:  # the search picked this target's prune setting and precision
        c = g["candidates"][g["chosen"]]
        manifest["search"] = {"chosen": {k: c.get(k) for k in ("label", "prune", "precision", "input_size", "p50_ms", "p90_ms", "proxy_accuracy", "final_accuracy",
                                                              "latency_source")},
                              "why": g.get("why"), "candidates": len(g["candidates"]), "finalists": g["finalists"],
                              "rank_correlation_proxy_final": g["rank_correlation_proxy_final"], "details": "dist/search.json"}
        if name in b.size_for:
            h, w = b.size_for[name]
            manifest["search"]["input_size"] = (f"the search chose input {h}x{w}, not the build file's preprocess.input_size "
                                                f"{b.cfg.preprocess.input_size[0]}x{b.cfg.preprocess.input_size[1]}: this bundle's model, preprocessing, "
                                                "calibration, validation and self-test all use it")
    manifest["model"].update(adapter(prof.runtime).manifest_extra(prof, artifact))
    source = vdir / "golden_source.txt"
    manifest["selftest_reference"] = source.read_text() if source.is_file() else None
    bundle_stage.write_bundle(bdir, manifest_mod.bundle_context(cfg, prof, artifact, manifest, data, golden, np.load(vdir / "golden_outputs.npy"), effective=effective))
    stage_row = {"stage": "artifact", "target": name, "precision": effective, "requested_precision": prof.precision,
                 "params": mmeta["params"], "macs": mmeta["macs"], "bytes": metrics["size_bytes"],
                 "val_accuracy": metrics.get("accuracy", precision_meta.get("accuracy")),
                 "host_latency_p50_ms": metrics.get("latency_p50_ms"), "host_latency_p90_ms": metrics.get("latency_p90_ms"),
                 "latency_runtime": (metrics.get("settings") or {}).get("runtime"),
                 "status": metrics["status"], "reason": metrics.get("reason")}
    report = {"profile": prof.model_dump(), "metrics": metrics, "gates": rows, "bundle": bundle_name, "input_size": list(cfg.preprocess.input_size),
              "precision": {"requested": prof.precision, "effective": effective},
              "quantization": precision_meta or None,
              "compression": mmeta if mstep.stage == "prune" else None,
              "status": "not run" if metrics["status"] not in ("measured", "emulated") else ("FAIL" if any(r["verdict"] == "FAIL" for r in rows) else "pass")}
    return TargetResult(report, rows, stage_row, bundle_name)


def golden_outputs(prof: TargetProfile, artifact: Path, x: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    """Outputs the artifact gives for the golden inputs on this host (the CPU of the same
    runtime when the target's own device is absent), and where they came from. Where the
    runtime cannot run on this OS at all (Core ML off macOS), the PyTorch reference's."""
    p = prof
    if unavailable_reason(prof):
        p = prof.model_copy(update={"device": "CPU", "arch": "any"})
        if unavailable_reason(p):
            why = adapter(prof.runtime).platform_reason(prof)
            if why:
                return reference, f"PyTorch reference (the runtime cannot run here: {why})"
            raise EdgebuildError(f"cannot compute golden outputs for {prof.name}: {unavailable_reason(p)}", hint="install the target's runtime on the build host")
    return open_runner(p, artifact).run(x), f"{prof.runtime} on this host's CPU"


def _emulated(b: "Build", name: str, prof: TargetProfile, eprof: TargetProfile, artifact: Path, m: dict, outputs, golden, out: Path,
              tmeta: dict, precision_meta: dict, calib_idx, mmeta: dict, effective: str, mref) -> dict:
    """Validate a foreign-arch target under qemu-user: a draft of its bundle (the same files the
    real one gets) runs its own infer.py in the arm64 root. Latency stays unmeasured."""
    from . import emulate

    cfg, data = b.target_cfg(name), b.data_for(name)
    draft = out / "emulated-bundle"
    draft.mkdir()
    manifest = manifest_mod.build_manifest(cfg, prof, m, tmeta, precision_meta, data, calib_idx, [], mmeta=mmeta, effective=effective)
    bundle_stage.write_bundle(draft, manifest_mod.bundle_context(cfg, prof, artifact, manifest, data, golden, outputs, effective=effective))
    try:
        return emulate.validate(eprof, draft, data.Xval, data.yval, mref, m["size_bytes"], b.cache.root, b.progress, b.progress.log)
    finally:
        import shutil

        shutil.rmtree(draft, ignore_errors=True)
