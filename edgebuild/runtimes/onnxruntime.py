"""ONNX Runtime adapter: ONNX export (``torch.onnx.export``), int8 by ``quantize_static`` (QDQ).

Format ``ort`` is ONNX Runtime Mobile: the (quantized) ONNX model converted by
``onnxruntime.tools.convert_onnx_models_to_ort`` to ``model.ort`` plus
``required_operators.config`` (the operator list for a reduced-size ONNX Runtime build), with
the mobile-usability report (NNAPI / Core ML execution-provider coverage, from
``onnxruntime.tools.check_onnx_model_mobile_usability``'s checker) kept for the manifest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
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
    import onnx
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
    quantizers = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(dst), load_external_data=False).graph.node)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "calibration": method, "stripped_node_metadata": stripped,
            "quantizers": quantizers,
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


ORT_FILES = ["model.ort", "required_operators.config"]
USABILITY = "mobile_usability.json"


def to_ort(onnx_path: Path, profile: TargetProfile) -> dict:
    """model.ort and required_operators.config beside ``onnx_path``, plus the usability report."""
    out = onnx_path.parent
    platform = "arm" if profile.arch in ("aarch64", "armv7l") else "amd64"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path), "--output_dir", tmp,
               "--optimization_style", "Fixed", "--target_platform", platform]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
        if r.returncode != 0 or not (Path(tmp) / "model.ort").is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(f"ONNX Runtime Mobile conversion to .ort failed: {tail[0][:300]}", hint="check the ONNX model with the full onnxruntime first")
        (Path(tmp) / "model.ort").replace(out / "model.ort")
        config = (Path(tmp) / "model.required_operators.config").read_text()
    # the tool names the temporary folder in its header comments: keep the file reproducible
    config = re.sub(r"(?m)^# - .*[/\\]([^/\\]+)$", r"# - \1", config)
    (out / "required_operators.config").write_text(config)
    report = mobile_usability(onnx_path)
    (out / USABILITY).write_text(json.dumps(report, indent=2) + "\n")
    return {"ort_seconds": time.perf_counter() - t0, "ort_target_platform": platform, "mobile_usability": report}


def mobile_usability(onnx_path: Path) -> dict:
    """How much of the model NNAPI (Android) and Core ML (iOS) execution providers could take,
    by ONNX Runtime's own mobile-usability checker (on the basic-optimized model, as it does)."""
    import logging

    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "model.onnx"
        optimize_model(onnx_path, opt, use_external_initializers=True)
        model = uc.ModelProtoWithShapeInfo(opt).model_with_shape_info
        out = {"tool": "onnxruntime.tools.check_onnx_model_mobile_usability (usability_checker)"}
        checks = {"NNAPI": lambda: uc.check_nnapi_partitions(model, True),
                  "CoreML MLProgram": lambda: uc.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md"),
                  "CoreML NeuralNetwork": lambda: uc.check_coreml_partitions(model, True, "coreml_supported_neuralnetwork_ops.md")}
        logging.getLogger("usability_checker").setLevel(logging.ERROR)
        for ep, check in checks.items():
            info = check()
            out[ep] = {"supported_nodes": info.num_supported_nodes, "nodes": info.num_nodes,
                       "coverage": round(info.num_supported_nodes / max(info.num_nodes, 1), 4), "partitions": info.num_partitions,
                       "unsupported_ops": sorted(info.unsupported_ops), "try_ep": info.suitability().name}
    return out


class OrtAdapter(Adapter):
    qat = True
    emulatable = True
    name = "onnxruntime"
    modules = ("onnxruntime",)
    packages = ("onnxruntime",)
    package = "onnxruntime"

    def model_files(self, profile: TargetProfile) -> list[str]:
        return ORT_FILES if profile.format == "ort" else ["model.onnx"]

    def artifact_files(self, profile: TargetProfile) -> list[str]:
        # an ORT-format artifact keeps its ONNX source (quantization starts from it) and the report
        return ORT_FILES + ["model.onnx", USABILITY] if profile.format == "ort" else ["model.onnx"]

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        from ..stages.export import export_onnx

        meta = {**export_onnx(model, example, out / "model.onnx", profile.opset, profile.batch), "format": profile.format}
        if profile.format == "ort":
            meta.update(to_ort(out / "model.onnx", profile))
        return meta

    def quantize_plan(self, profile: TargetProfile) -> list[tuple[str, dict]]:
        plan = [("plain", {}), ("first conv and head in float", {"float_layers": True})]
        for method in ("entropy", "percentile"):
            if method != profile.quantization.calibration:
                plan.append((f"first conv and head in float, {method} calibration", {"float_layers": True, "calibration": method}))
        return plan

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        names = float_layers(src / "model.onnx") if opts.get("float_layers") else None
        meta = quantize_onnxruntime(src / "model.onnx", dst / "model.onnx", calib, profile, calibration=opts.get("calibration"), exclude_nodes=names)
        if profile.format == "ort":
            meta.update(to_ort(dst / "model.onnx", profile))
        return meta

    def manifest_extra(self, profile: TargetProfile, artifact: Path) -> dict:
        if profile.format != "ort":
            return {}
        return {"mobile_usability": json.loads((artifact / USABILITY).read_text()),
                "required_operators": "required_operators.config (for a reduced-size ONNX Runtime build: --include_ops_by_config)"}

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
