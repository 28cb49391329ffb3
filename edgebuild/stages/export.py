"""Export: the PyTorch model to one self-contained ONNX file, then to OpenVINO IR if asked.

The ONNX graph comes from ``torch.onnx.export`` (torch.export-based); its input is ``input``
(NCHW float32, batch static or dynamic per profile) and its output ``logits``. OpenVINO IR is
converted from that same ONNX file, so every target starts from one graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import TargetProfile
from ..errors import ModelError

NAME = "export"
VERSION = 2
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _unsupported_op(err: BaseException) -> str | None:
    import re

    text = str(err)
    m = re.search(r"(aten::[A-Za-z0-9_.]+|aten\.[A-Za-z0-9_.]+)", text)
    return m.group(1) if m else None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, batch) -> dict:
    model = model.cpu().eval()
    h_w_c = tuple(example.shape[1:])
    x = torch.zeros((batch if isinstance(batch, int) else 1,) + h_w_c)
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, external_data=False)
    if batch == "dynamic":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    t0 = time.perf_counter()
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=True, **kwargs)
    except Exception as e:
        op = _unsupported_op(e)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"ONNX export failed{' at op ' + op if op else ''}: {first}",
            hint="replace the unsupported op in the model, or try another opset in the target profile",
        ) from e
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
    seconds = time.perf_counter() - t0
    import onnx

    m = onnx.load(str(path))
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:
        raise ModelError(f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}", hint="report this as a bug with the model") from e
    data_files = [p for p in path.parent.iterdir() if p.name.endswith(".data")]
    if data_files:
        raise ModelError("ONNX export wrote external data files; edgebuild expects one self-contained file", hint="models over 2 GB are not supported yet")
    opset_used = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), opset)
    return {"seconds": seconds, "opset": int(opset_used), "opset_requested": int(opset), "bytes": path.stat().st_size}


def to_openvino(onnx_path: Path, xml_path: Path, profile: TargetProfile, example_shape: tuple[int, ...]) -> dict:
    import openvino as ov

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
    from ..runtimes.openvino import save_model

    save_model(ovm, xml_path, compress_to_fp16=(profile.precision == "fp16"))
    return {"seconds": time.perf_counter() - t0, "bytes": xml_path.stat().st_size + xml_path.with_suffix(".bin").stat().st_size}


def run(model: nn.Module, example: torch.Tensor, profile: TargetProfile, out: Path) -> dict:
    meta = export_onnx(model, example, out / "model.onnx", profile.opset, profile.batch)
    meta["format"] = "onnx"
    if profile.format == "openvino":
        ovmeta = to_openvino(out / "model.onnx", out / "model.xml", profile, tuple(example.shape))
        meta.update({"format": "openvino", "ov_seconds": ovmeta["seconds"], "bytes": ovmeta["bytes"]})
    return meta
