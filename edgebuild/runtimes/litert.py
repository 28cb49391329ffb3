"""LiteRT (TFLite) adapter: ``litert_torch.convert`` to a .tflite flatbuffer, int8 by LiteRT's
own AI Edge Quantizer (static int8 weights and activations, min-max calibration), run by
``ai_edge_litert.interpreter.Interpreter`` (XNNPACK on CPU). Needs the ``litert`` extra."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from . import Adapter, Runner

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter's C++ logging


def to_float(t: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    return (t.astype(np.float32) - zero) * scale if scale else t.astype(np.float32)


def from_float(x: np.ndarray, detail: dict) -> np.ndarray:
    """A float batch as the tensor's type: quantized with its scale/zero point where it is int8."""
    scale, zero = detail["quantization"]
    if not scale:
        return x.astype(detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])


class LiteRtRunner(Runner):
    def __init__(self, path: Path, profile: TargetProfile):
        from ai_edge_litert import interpreter as tfl

        self.interpreter = tfl.Interpreter(model_path=str(path), num_threads=profile.threads or None)
        self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self.static_batch = int(self.inp["shape"][0])
        from ..stages.bundle import pkg_version

        self.settings = {"runtime": "litert", "runtime_version": pkg_version("ai-edge-litert"), "delegate": "XNNPACK (CPU)",
                         "threads": profile.threads or "default", "input_dtype": np.dtype(self.inp["dtype"]).name}

    def _run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.inp["index"], from_float(x, self.inp))
        self.interpreter.invoke()
        return to_float(self.interpreter.get_tensor(self.out["index"]), self.out)


def signature(path: Path) -> tuple[str, str]:
    from ai_edge_litert import interpreter as tfl

    sigs = tfl.Interpreter(model_path=str(path)).get_signature_list()
    name = next(iter(sigs))
    return name, sigs[name]["inputs"][0]


def quantize_litert(src: Path, dst: Path, calib: np.ndarray, profile: TargetProfile, mode: str) -> dict:
    from ai_edge_quantizer import quantizer, recipe

    from ..stages.quantize import quiet

    static = profile.batch if isinstance(profile.batch, int) else 1
    t0 = time.perf_counter()
    try:
        with quiet():
            q = quantizer.Quantizer(str(src))
            q.load_quantization_recipe(recipe.static_wi8_ai8() if mode == "static" else recipe.dynamic_wi8_afp32())
            cal = None
            if mode == "static":
                sig, name = signature(src)
                items = [{name: np.ascontiguousarray(calib[b : b + static], dtype=np.float32)} for b in range(0, len(calib) - static + 1, static)]
                cal = q.calibrate({sig: items}, num_threads=max(1, profile.threads or 1))
            q.quantize(cal, enable_progress_report=False).export_model(str(dst), overwrite=True)
    except Exception as e:
        raise ModelError(f"LiteRT quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="use an fp32 LiteRT target, or fallback: fp32 in the profile") from e
    from ..stages.bundle import pkg_version

    return {"tool": "ai_edge_quantizer " + ("static_wi8_ai8" if mode == "static" else "dynamic_wi8_afp32"),
            "ai_edge_quantizer_version": pkg_version("ai-edge-quantizer"),
            "weights": "int8 (per-channel)", "activations": "int8 (min-max calibration)" if mode == "static" else "float (dynamic range)",
            "seconds": time.perf_counter() - t0}


class LiteRtAdapter(Adapter):
    emulatable = True
    name = "litert"
    extra = "litert"
    modules = ("litert_torch", "ai_edge_litert.interpreter", "ai_edge_quantizer")
    packages = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    package = "ai-edge-litert"

    def model_files(self, profile: TargetProfile) -> list[str]:
        return ["model.tflite"]

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        import litert_torch

        from ..stages.export import convert

        path = out / "model.tflite"
        _, seconds = convert(model, example, profile.batch, "LiteRT conversion", lambda m, x: litert_torch.convert(m, (x,)).export(str(path)))
        return {"format": "tflite", "tool": "litert_torch.convert", "seconds": seconds, "bytes": path.stat().st_size}

    def quantize_plan(self, profile: TargetProfile) -> list[tuple[str, dict]]:
        return [("plain", {}), ("int8 weights only, float activations (dynamic range)", {"mode": "dynamic"})]

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        return quantize_litert(src / "model.tflite", dst / "model.tflite", calib, profile, opts.get("mode", "static"))

    def runner(self, profile: TargetProfile, artifact_dir: Path, precision: str) -> Runner:
        return LiteRtRunner(artifact_dir / "model.tflite", profile)


ADAPTER = LiteRtAdapter()
