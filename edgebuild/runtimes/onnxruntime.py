"""ONNX Runtime adapter: ONNX export (``torch.onnx.export``), int8 by ``quantize_static`` (QDQ)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from ..profiles import ort_provider
from . import Adapter, Runner


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
    from ..stages.quantize import quiet

    t0 = time.perf_counter()
    try:
        with quiet():
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



def float_layers(model_path: Path) -> list[str]:
    """Names of the first convolution and the head (last MatMul/Gemm) of an ONNX file."""
    import onnx

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    first = next((n.name for n in nodes if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [n for n in (first, last) if n]


class OrtAdapter(Adapter):
    name = "onnxruntime"
    modules = ("onnxruntime",)
    packages = ("onnxruntime",)
    package = "onnxruntime"

    def model_files(self, profile: TargetProfile) -> list[str]:
        return ["model.onnx"]

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        from ..stages.export import export_onnx

        return {**export_onnx(model, example, out / "model.onnx", profile.opset, profile.batch), "format": "onnx"}

    def quantize_plan(self, profile: TargetProfile) -> list[tuple[str, dict]]:
        plan = [("plain", {}), ("first conv and head in float", {"float_layers": True})]
        for method in ("entropy", "percentile"):
            if method != profile.quantization.calibration:
                plan.append((f"first conv and head in float, {method} calibration", {"float_layers": True, "calibration": method}))
        return plan

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        names = float_layers(src / "model.onnx") if opts.get("float_layers") else None
        return quantize_onnxruntime(src / "model.onnx", dst / "model.onnx", calib, profile, calibration=opts.get("calibration"), exclude_nodes=names)

    def host_reason(self, profile: TargetProfile) -> str | None:
        import onnxruntime as ort

        provider = ort_provider(profile.device)
        if provider not in ort.get_available_providers():
            return f"ONNX Runtime execution provider {provider} is not available on this host (have: {', '.join(ort.get_available_providers())})"
        return None

    def runner(self, profile: TargetProfile, artifact_dir: Path, precision: str) -> Runner:
        return OrtRunner(artifact_dir / self.model_files(profile)[0], profile)

    def template_context(self, profile: TargetProfile, precision: str) -> dict:
        return {"providers": [ort_provider(profile.device)]}


ADAPTER = OrtAdapter()
