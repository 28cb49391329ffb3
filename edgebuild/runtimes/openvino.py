"""OpenVINO adapter: IR converted from the ONNX export, int8 by NNCF. The inference precision is always set explicitly: on CPUs with
AVX512-BF16/AMX the plugin would otherwise run "fp32" models in bf16."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from . import Adapter, Runner


def inference_precision(core, device: str, precision: str) -> str:
    """The compute precision an artifact runs at. fp16 artifacts keep fp16-compressed weights (half
    the file) everywhere, but compute in f32 on CPUs: measured on a Xeon whose CPU plugin reports
    FP16, f16 inference ran ResNet-18 at 22.9 ms against 13.2 ms in f32 (README, Target profiles).
    GPUs and NPUs compute in f16. ``core`` is kept for adapters that ask the device."""
    if precision == "fp16" and not device.startswith("CPU"):
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


def to_openvino(onnx_path: Path, xml_path: Path, profile: TargetProfile, example_shape: tuple[int, ...]) -> dict:
    import openvino as ov

    from ..stages.export import INPUT_NAME

    t0 = time.perf_counter()
    shape = list(example_shape)
    if profile.batch == "dynamic":
        shape[0] = -1
    else:
        shape[0] = int(profile.batch)
    try:
        ovm = ov.convert_model(str(onnx_path), input=[(INPUT_NAME, ov.PartialShape(shape))])
    except Exception as e:
        raise ModelError(f"OpenVINO conversion failed: {str(e).strip().splitlines()[0][:300]}", hint="check the ONNX model with onnx.checker and the OpenVINO release notes") from e
    save_model(ovm, xml_path, compress_to_fp16=(profile.precision == "fp16"))
    return {"seconds": time.perf_counter() - t0, "bytes": xml_path.stat().st_size + xml_path.with_suffix(".bin").stat().st_size}


WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")
PROGRESS = ("Total number of quantized", "Accuracy drop", "Reverted", "Re-calculating ranking", "Algorithm completed", "Maximum number")


@contextlib.contextmanager
def nncf_progress(log):
    """NNCF's accuracy-control steps (minutes on big models) as build log lines; NNCF's own console
    handler stays quiet."""
    lg = logging.getLogger("nncf")
    if log is None:
        yield
        return

    class Forward(logging.Handler):
        def emit(self, record):
            msg = record.getMessage().strip().splitlines()
            if msg and msg[0].startswith(PROGRESS):
                log(f"    NNCF: {msg[0].rstrip(':')}")

    saved = lg.level, [(h, h.level) for h in lg.handlers]
    for h in lg.handlers:
        h.setLevel(logging.ERROR)
    fwd = Forward(logging.INFO)
    lg.addHandler(fwd)
    lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        lg.removeHandler(fwd)
        lg.setLevel(saved[0])
        for h, level in saved[1]:
            h.setLevel(level)


def quantize_openvino(src_xml: Path, dst_xml: Path, calib: np.ndarray, profile: TargetProfile, ignored: list[str] | None = None,
                      preset: str | None = None, accuracy_control: dict | None = None) -> dict:
    import nncf
    import openvino as ov

    static = profile.batch if isinstance(profile.batch, int) else 1
    items = [np.ascontiguousarray(calib[b : b + static], dtype=np.float32) for b in range(0, len(calib) - static + 1, static)]
    from ..stages.quantize import quiet

    t0 = time.perf_counter()
    try:
        with quiet():
            model = ov.Core().read_model(str(src_xml))
            preset = preset or profile.quantization.preset
            qpreset = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
            kwargs = {}
            if ignored:
                kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
            info = {}
            if accuracy_control:
                from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

                ac = accuracy_control
                # each iteration returns a group of operations to float: bounded in time here, and the
                # guard rejects a result that is mostly float (seen unbounded: 75 of 78 operations
                # reverted in 150 s, an fp32 model in an int8 file)
                weighted = sum(o.get_type_name() in WEIGHTED for o in model.get_ordered_ops())
                info["max_iterations"] = max(1, int(profile.quantization.max_reverted * weighted))
                with nncf_progress(ac.get("log")):
                    q = nncf.quantize_with_accuracy_control(
                        model, nncf.Dataset(items), nncf.Dataset(ac["val_items"]), ac["validation_fn"], max_drop=ac["max_drop"],
                        drop_type=nncf.DropType.ABSOLUTE, preset=qpreset, subset_size=len(items),
                        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=info["max_iterations"]), **kwargs)
            else:
                q = nncf.quantize(model, nncf.Dataset(items), preset=qpreset, subset_size=len(items), **kwargs)
            save_model(q, dst_xml, compress_to_fp16=False)
            info["quantizers"] = sum(o.get_type_name() == "FakeQuantize" for o in q.get_ordered_ops())
    except Exception as e:
        raise ModelError(f"NNCF quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="try preset: mixed in the target profile, or an fp16/fp32 target") from e
    return {"tool": "nncf.quantize_with_accuracy_control" if accuracy_control else "nncf.quantize", "nncf_version": nncf.__version__, "preset": preset,
            "ignored": ignored or [], **info, "seconds": time.perf_counter() - t0}



def float_layers(model_path: Path) -> list[str]:
    """Names of the first convolution and the head (last MatMul) of an OpenVINO IR."""
    import openvino as ov

    ops = list(ov.Core().read_model(str(model_path)).get_ordered_ops())
    first = next((o.get_friendly_name() for o in ops if o.get_type_name() in ("Convolution", "GroupConvolution")), None)
    last = next((o.get_friendly_name() for o in reversed(ops) if o.get_type_name() == "MatMul"), None)
    return [n for n in (first, last) if n]


class OvAdapter(Adapter):
    qat = True
    name = "openvino"
    modules = ("openvino",)
    packages = ("openvino", "nncf")
    package = "openvino"
    accuracy_control = True

    def model_files(self, profile: TargetProfile) -> list[str]:
        return ["model.xml", "model.bin"]

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        from ..stages.export import export_onnx

        meta = export_onnx(model, example, out / "model.onnx", profile.opset, profile.batch)
        ovmeta = to_openvino(out / "model.onnx", out / "model.xml", profile, tuple(example.shape))
        (out / "model.onnx").unlink()
        return {**meta, "format": "openvino", "ov_seconds": ovmeta["seconds"], "bytes": ovmeta["bytes"]}

    def quantize_plan(self, profile: TargetProfile) -> list[tuple[str, dict]]:
        plan = [("plain", {}), ("first conv and head in float", {"float_layers": True})]
        if profile.quantization.preset != "mixed":
            plan.append(("first conv and head in float, mixed preset (asymmetric activations)", {"float_layers": True, "preset": "mixed"}))
        plan.append(("NNCF accuracy-controlled quantization", {"float_layers": True, "accuracy_control": True}))
        return plan

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        names = float_layers(src / "model.xml") if opts.get("float_layers") else None
        return quantize_openvino(src / "model.xml", dst / "model.xml", calib, profile, ignored=names, preset=opts.get("preset"),
                                 accuracy_control=ac if opts.get("accuracy_control") else None)

    def fallback(self, profile: TargetProfile, src: Path, out: Path, precision: str) -> str:
        if precision != "fp16":
            return super().fallback(profile, src, out, precision)
        import openvino as ov

        save_model(ov.Core().read_model(str(src / "model.xml")), out / "model.xml", compress_to_fp16=True)
        return "fp16"

    def host_reason(self, profile: TargetProfile) -> str | None:
        import openvino as ov

        devices = ov.Core().available_devices
        dev = profile.device.split(".")[0]
        if not any(d.split(".")[0] == dev for d in devices):
            return f"OpenVINO device {profile.device} is not present on this host (have: {', '.join(devices)})"
        return None

    def runner(self, profile: TargetProfile, artifact_dir: Path, precision: str) -> Runner:
        return OvRunner(artifact_dir / "model.xml", profile, precision)

    def template_context(self, profile: TargetProfile, precision: str) -> dict:
        prec = inference_precision(None, profile.device, precision)  # decided from the device kind: no OpenVINO import
        from ..resources import templates_dir

        return {"inference_precision": prec, "has_cpp": (templates_dir() / "cpp").is_dir()}


ADAPTER = OvAdapter()
