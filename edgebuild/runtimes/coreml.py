"""Core ML adapter: ``coremltools.convert`` of the ``torch.export`` program to an ML Program
(.mlpackage, fp16 or fp32 compute precision, iOS 16+); int8 by Core ML's own linear weight
quantization (``coremltools.optimize.coreml.linear_quantize_weights``, per-channel symmetric).
Core ML runs only on Apple platforms: elsewhere validation is "not run: needs macOS", and the
bundle's golden outputs are the PyTorch reference's. Needs the ``coreml`` extra.

Reproducible packages: coremltools names a package's items by random UUIDs in its
``Manifest.json`` (model spec and weights are otherwise byte-identical run to run); they are
replaced by UUIDs derived from each item's path, so the same model gives the same bytes."""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from . import Adapter, Runner

PACKAGE = "model.mlpackage"
DEPLOYMENT_TARGET = "iOS16"


class CoreMlRunner(Runner):  # pragma: no cover - macOS only
    def __init__(self, path: Path, profile: TargetProfile):
        import coremltools as ct

        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY if profile.device == "CPU" else ct.ComputeUnit.ALL)
        spec = self.model.get_spec()
        self.static_batch = int(spec.description.input[0].type.multiArrayType.shape[0])
        self.settings = {"runtime": "coreml", "runtime_version": ct.__version__, "compute_units": profile.device}

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict({"input": x})["logits"], dtype=np.float32)


class CoreMlAdapter(Adapter):
    name = "coreml"
    extra = "coreml"
    modules = ("coremltools",)
    packages = ("coremltools",)
    package = "coremltools"
    revision = 1  # 1: Manifest.json item identifiers derived from their paths, not random

    def model_files(self, profile: TargetProfile) -> list[str]:
        return [PACKAGE]

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        import coremltools as ct
        import torch

        from ..stages.export import INPUT_NAME, OUTPUT_NAME, convert

        precision = ct.precision.FLOAT16 if profile.precision == "fp16" else ct.precision.FLOAT32

        def run(m, x):
            import contextlib
            import io

            ep = torch.export.export(m, (x,)).run_decompositions({})
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
                ml = ct.convert(ep, convert_to="mlprogram", compute_precision=precision, inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(x.shape))],
                                outputs=[ct.TensorType(name=OUTPUT_NAME)], minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET))
            ml.save(str(out / PACKAGE))

        _, seconds = convert(model, example, profile.batch, "Core ML conversion", run)
        normalise(out / PACKAGE)
        return {"format": "mlpackage", "tool": f"coremltools.convert (mlprogram, {DEPLOYMENT_TARGET})",
                "compute_precision": "fp16" if profile.precision == "fp16" else "fp32", "seconds": seconds,
                "bytes": sum(p.stat().st_size for p in (out / PACKAGE).rglob("*") if p.is_file())}

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        import coremltools as ct
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

        from ..stages.quantize import quiet

        t0 = time.perf_counter()
        try:
            with quiet():
                ml = ct.models.MLModel(str(src / PACKAGE), skip_model_load=True)
                cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel"))
                linear_quantize_weights(ml, config=cfg).save(str(dst / PACKAGE))
        except Exception as e:
            raise ModelError(f"Core ML weight quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                             hint="use the fp16 Core ML target") from e
        normalise(dst / PACKAGE)
        return {"tool": "coremltools.optimize.coreml.linear_quantize_weights", "weights": "int8 (linear symmetric, per-channel)",
                "activations": "float (Core ML has no calibrated activation quantization here)", "seconds": time.perf_counter() - t0}

    def fallback(self, profile: TargetProfile, src: Path, out: Path, precision: str) -> str:
        shutil.copytree(src / PACKAGE, out / PACKAGE)
        return "fp16" if profile.precision == "fp16" else "fp32"

    def platform_reason(self, profile: TargetProfile) -> str | None:
        if sys.platform != "darwin":
            return "needs macOS (Core ML runs only on Apple platforms)"
        return None

    def runner(self, profile: TargetProfile, artifact_dir: Path, precision: str) -> Runner:  # pragma: no cover - macOS only
        return CoreMlRunner(artifact_dir / PACKAGE, profile)


def normalise(package: Path) -> None:
    """Make a saved .mlpackage a function of the model alone.

    coremltools writes a debug-handle map beside the manifest when ExecuTorch is installed; it
    is not part of the model and would make the artifact depend on what else is installed: it
    goes. ``Manifest.json`` keys each item (model spec, weights) by a random UUID; each becomes
    a UUID derived from the item's path in the package (unique there, as the format needs), and
    the file is written as coremltools' own writer does (4-space indent, sorted keys)."""
    for p in package.glob("executorch_debug_handle_mapping.json"):
        p.unlink()
    path = package / "Manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    entries = manifest.get("itemInfoEntries", {})
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"edgebuild:mlpackage:{entry['path']}")) for old, entry in entries.items()}
    manifest["itemInfoEntries"] = {ids[old]: entry for old, entry in entries.items()}
    if manifest.get("rootModelIdentifier") in ids:
        manifest["rootModelIdentifier"] = ids[manifest["rootModelIdentifier"]]
    path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")


ADAPTER = CoreMlAdapter()
