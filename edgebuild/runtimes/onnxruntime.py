"""ONNX Runtime adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..profiles import ort_provider
from . import Runner


class OrtRunner(Runner):
    def __init__(self, path: Path, profile: TargetProfile):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if profile.threads:
            so.intra_op_num_threads = profile.threads
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        provider = ort_provider(profile.device)
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=[provider])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.settings = {
            "runtime": "onnxruntime",
            "runtime_version": ort.__version__,
            "provider": provider,
            "threads": profile.threads or "default",
            "graph_optimization": "ORT_ENABLE_ALL",
        }

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]
