"""OpenVINO adapter. The inference precision is always set explicitly: on CPUs with
AVX512-BF16/AMX the plugin would otherwise run "fp32" models in bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import TargetProfile
from . import Runner


def inference_precision(core, device: str, precision: str) -> str:
    if precision == "fp16":
        if device.startswith("CPU"):
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            return "f16" if "FP16" in caps else "f32"
        return "f16"
    return "f32"


class OvRunner(Runner):
    def __init__(self, path: Path, profile: TargetProfile, precision: str):
        import openvino as ov

        core = ov.Core()
        prec = inference_precision(core, profile.device, precision)
        config = {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if profile.threads and profile.device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = str(profile.threads)
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, profile.device, config)
        self.request = self.compiled.create_infer_request()
        pshape = self.compiled.input(0).get_partial_shape()
        self.static_batch = pshape[0].get_length() if pshape[0].is_static else None
        self.settings = {
            "runtime": "openvino",
            "runtime_version": ov.get_version(),
            "device": profile.device,
            "inference_precision": prec,
            "threads": profile.threads or "default",
            "performance_hint": "LATENCY",
        }

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[self.compiled.output(0)])


def save_model(model, xml_path, compress_to_fp16: bool = False) -> None:
    """ov.save_model with reproducible node names.

    OpenVINO names unnamed nodes from a process-wide counter (``Constant_31237``), so the same
    graph saved by two processes, or twice in one, differs byte for byte. Auto-generated names
    are replaced by ``TYPE_INDEX`` in topological order; names that came from the model stay.
    """
    import re

    import openvino as ov

    auto = re.compile(r"^(?P<type>[A-Za-z][A-Za-z0-9]*)_\d+$")
    for i, op in enumerate(model.get_ordered_ops()):
        name = op.get_friendly_name()
        m = auto.match(name)
        if m and m.group("type") == op.get_type_name() or (m and op.get_type_name() == "Constant"):
            op.set_friendly_name(f"{op.get_type_name()}_eb{i}")
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
