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
import time
import warnings
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError

NAME = "quantize"
VERSION = 1


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
                extra_options={"CalibMovingAverage": method == "minmax"} if False else {},
            )
    except Exception as e:
        raise ModelError(f"ONNX Runtime quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="try another calibration method in the target profile, or an fp32 target") from e
    finally:
        pre.unlink(missing_ok=True)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "calibration": method,
            "per_channel": profile.quantization.per_channel, "activations": "uint8", "weights": "int8",
            "excluded_nodes": exclude_nodes or [], "seconds": time.perf_counter() - t0}


def quantize_openvino(src_xml: Path, dst_xml: Path, calib: np.ndarray, profile: TargetProfile, ignored: list[str] | None = None) -> dict:
    import nncf
    import openvino as ov

    static = profile.batch if isinstance(profile.batch, int) else 1
    items = [np.ascontiguousarray(calib[b : b + static], dtype=np.float32) for b in range(0, len(calib) - static + 1, static)]
    t0 = time.perf_counter()
    try:
        with _quiet():
            model = ov.Core().read_model(str(src_xml))
            preset = nncf.QuantizationPreset.MIXED if profile.quantization.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
            kwargs = {}
            if ignored:
                kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
            q = nncf.quantize(model, nncf.Dataset(items), preset=preset, subset_size=len(items), **kwargs)
            ov.save_model(q, str(dst_xml), compress_to_fp16=False)
    except Exception as e:
        raise ModelError(f"NNCF quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="try preset: mixed in the target profile, or an fp16/fp32 target") from e
    return {"tool": "nncf.quantize", "nncf_version": nncf.__version__, "preset": profile.quantization.preset,
            "ignored": ignored or [], "seconds": time.perf_counter() - t0}


def run(profile: TargetProfile, src: Path, out: Path, calib: np.ndarray) -> dict:
    if profile.runtime == "onnxruntime":
        return quantize_onnxruntime(src / "model.onnx", out / "model.onnx", calib, profile)
    return quantize_openvino(src / "model.xml", out / "model.xml", calib, profile)
