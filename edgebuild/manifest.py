"""What a bundle says about itself: manifest.json, the template context of its stubs and
README, and the provenance helpers they use. Pure functions of the build's results."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np

from . import __version__, backbones
from .config import BuildConfig, TargetProfile
from .data import preprocess_args, sha256_file
from .stages import bundle as bundle_stage
from .stages import export as export_stage

PACKAGES = ["torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "torch-pruning", "numpy", "pillow", "transformers"]

TIMING_KEYS = {"seconds", "latency_p50_ms", "latency_p90_ms", "throughput_ips", "benchmark", "hostname", "host_latency",
               "host_latency_before", "host_latency_after", "mean_epoch_seconds", "epoch_seconds", "feature_seconds", "created"}


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty(path: Path) -> bool | None:
    """True when the build folder's git checkout has uncommitted changes (None: not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def strip_timings(obj):
    """A copy of ``obj`` without host timings (any key in TIMING_KEYS, or ending in _seconds/_ms)."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items()
                if not (k in TIMING_KEYS or k.endswith("_seconds") or k.endswith("_ms"))}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def compression(pmeta: dict) -> dict:
    """The prune stage's record for reports and manifests."""
    keys = ("ratio", "importance", "scope", "align", "kept", "kept_automatically", "recover_epochs", "recovery", "accuracy_before", "accuracy_after_prune",
            "accuracy_recovered", "params_before", "params", "params_ratio", "macs_before", "macs", "macs_ratio", "host_latency_before", "host_latency")
    return {"prune": {k: pmeta.get(k) for k in keys}, "distill": pmeta.get("recovery", {}).get("loss") == "distillation"}


def build_manifest(cfg: BuildConfig, prof: TargetProfile, metrics: dict, tmeta: dict, qmeta: dict, data, calib_idx, rows: list,
                   mmeta: dict | None = None, effective: str | None = None, reproducible: bool = False) -> dict:
    """manifest.json of one bundle (schema edgebuild.bundle/1), less its ``files`` table."""
    mmeta = mmeta or tmeta
    effective = effective or prof.precision
    files = export_stage.model_files(prof)
    static = prof.batch if isinstance(prof.batch, int) else "N"
    shape_in = [static, cfg.preprocess.channels, *cfg.preprocess.input_size]
    counts: dict[str, int] = {}
    for i in calib_idx:
        c = data.classes[int(data.ytrain[i])]
        counts[c] = counts.get(c, 0) + 1
    calib_hash = hashlib.sha256(np.ascontiguousarray(data.Xtrain[calib_idx]).tobytes()).hexdigest()
    m = {k: metrics.get(k) for k in ("accuracy", "test_accuracy", "reference_accuracy", "agreement", "max_abs_diff", "latency_p50_ms", "latency_p90_ms",
                                     "throughput_ips", "validated", "latency", "selftest", "emulation") if k in metrics}
    m.update({
        "status": metrics["status"],
        "reason": metrics.get("reason"),
        "size_bytes": metrics["size_bytes"],
        "macs": mmeta["macs"],
        "params": mmeta["params"],
        "fp32_reference_accuracy": tmeta["val_accuracy"],
        "validation": {"runtime_settings": metrics.get("settings"), "host": metrics.get("host"), "samples": metrics.get("samples"),
                       "benchmark": metrics.get("benchmark")},
        "gates": rows,
    })
    weights = cfg.resolve(cfg.backbone.weights) if cfg.backbone.weights else None
    if weights is None and cfg.transfer.mode != "scratch":  # the provider's own weights (backbone.pretrained)
        weights = backbones.pretrained_file(cfg.backbone.source, cfg.root, cfg.backbone.pretrained)
    manifest = {
        "schema": bundle_stage.SCHEMA,
        "name": cfg.name,
        "version": cfg.version,
        "target": prof.model_dump(mode="json"),
        "model": {
            "files": files,
            "file": files[0],
            "format": prof.format,
            "precision": effective,
            "requested_precision": prof.precision,
            "inputs": [{"name": export_stage.INPUT_NAME, "shape": shape_in, "dtype": "float32", "layout": "NCHW"}],
            "outputs": [{"name": export_stage.OUTPUT_NAME, "shape": [static, len(data.classes)], "dtype": "float32", "layout": "NC"}],
            "quantization": qmeta or None,
            "calibration": {"samples": int(len(calib_idx)), "class_counts": counts, "sha256": calib_hash, "seed": cfg.seed} if prof.precision == "int8" else None,
        },
        "preprocess": preprocess_args(cfg.preprocess),
        "labels": list(data.classes),
        # the data paths as the build file gives them (relative to it), not where the project lives:
        # the same project in another folder gives the same manifest
        "data": {**data.record, **{k: getattr(cfg.data, k, None) for k in ("train", "val", "test")}} if getattr(data, "record", None) else None,
        "metrics": m,
        "transfer": {k: tmeta.get(k) for k in ("mode", "head", "features", "val_accuracy", "test_accuracy", "best_epoch", "optimizer", "lr", "augment", "device", "world_size", "backend", "precision", "mean_epoch_seconds")},
        "compression": compression(mmeta) if "accuracy_after_prune" in mmeta else None,
        "provenance": {
            "config_sha256": sha256_file(cfg.path) if cfg.path else None,
            "data_sha256": data.fingerprint,
            "backbone_source": cfg.backbone.source,
            "backbone_weights_sha256": sha256_file(weights) if weights and weights.is_file() else None,
            "seed": cfg.seed,
            "packages": {"edgebuild": __version__, **{p: bundle_stage.pkg_version(p) for p in PACKAGES}},
            "git_commit": git_commit(cfg.root),
            "git_dirty": git_dirty(cfg.root),
        },
    }
    if reproducible:
        manifest = strip_timings(manifest)
        for g in manifest["metrics"]["gates"]:
            if g["budget"].startswith("max_latency") and g["measured"] is not None:
                g["measured"] = "omitted (see report.json)"
        manifest["metrics"]["timings"] = "omitted: reproducible build (host timings vary run to run); see dist/report.json"
    return manifest


def figures(m: dict) -> list[tuple[str, str]]:
    """The validated figures the bundle README shows."""
    if m["status"] == "emulated":
        return [("validation", m["validated"]), ("val accuracy", f"{m['accuracy']:.4f}"),
                ("fp32 reference accuracy", f"{m['fp32_reference_accuracy']:.4f}"),
                ("top-1 agreement with reference", f"{m['agreement']:.4f}"), ("max abs diff vs reference", f"{m['max_abs_diff']:.3g}"),
                ("latency", "not measured (emulated)"), ("size", f"{m['size_bytes']} bytes")]
    if m["status"] != "measured":
        return [("validation", f"not run: {m.get('reason')}"), ("size", f"{m['size_bytes']} bytes")]
    return [
        ("val accuracy", f"{m['accuracy']:.4f}"),
        ("fp32 reference accuracy", f"{m['fp32_reference_accuracy']:.4f}"),
        ("top-1 agreement with reference", f"{m['agreement']:.4f}"),
        ("max abs diff vs reference", f"{m['max_abs_diff']:.3g}"),
        ("latency p50 / p90", f"{m['latency_p50_ms']:.3f} / {m['latency_p90_ms']:.3f} ms" if "latency_p50_ms" in m
         else "omitted in a reproducible build; see report.json"),
        ("size", f"{m['size_bytes']} bytes"),
        ("MACs / params", f"{m['macs']} / {m['params']}"),
    ]


def bundle_context(cfg: BuildConfig, prof: TargetProfile, artifact: Path, manifest: dict, data, golden, golden_out,
                   effective: str | None = None) -> dict:
    """Everything stages.bundle.write_bundle needs: files, golden vectors, template context."""
    from .runtimes import adapter

    effective = effective or prof.precision
    rt = adapter(prof.runtime)
    files = manifest["model"]["files"]
    template = {
        "edgebuild_version": __version__,
        "title": f"{cfg.name} {cfg.version} for {prof.name}",
        "name": cfg.name,
        "version": cfg.version,
        "target": prof.name,
        "description": prof.description,
        "runtime": prof.runtime,
        "runtime_package": rt.package,
        "runtime_version": bundle_stage.pkg_version(rt.package),
        "numpy_min": "1.24",
        "pillow_min": "9.1",
        "model_file": files[0],
        "format": prof.format,
        "device": prof.device,
        "arch": prof.arch,
        "platform": prof.platform,
        "precision": effective,
        "requested_precision": prof.precision,
        "threads": prof.threads,
        "preprocess": preprocess_args(cfg.preprocess),
        "labels": list(data.classes),
        "input_name": export_stage.INPUT_NAME,
        "output_name": export_stage.OUTPUT_NAME,
        "input_shape": manifest["model"]["inputs"][0]["shape"],
        "output_shape": manifest["model"]["outputs"][0]["shape"],
        "has_cpp": False,
        "figures": figures(manifest["metrics"]),
    }
    template.update(rt.template_context(prof, effective))
    return {
        "profile": prof,
        "artifact": artifact,
        "model_files": files,
        "labels": list(data.classes),
        "template": template,
        "golden_inputs": data.Xval[golden],
        "golden_outputs": golden_out,
        "golden_raw": [data.val_files[i] for i in golden],
        "effective_precision": effective,
        "manifest": manifest,
    }
