"""Quantization-aware training: the accuracy guard's last remedy and the profile's method: qat."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild.qat import QATJob
from edgebuild.stages import quantize as quantize_stage

from conftest import export_for_quantize, write_config

EXAMPLE = torch.zeros(1, 1, 8, 8)


def outlier_model() -> nn.Module:
    """Exact in fp32, hopeless for post-training int8: the first convolution writes an outlier
    channel (127 x the input) beside a fine one (0.45 x); one per-tensor activation scale for
    both rounds the fine channel to zero, and the class needs the sign of both."""
    conv1, conv2, head = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), nn.Linear(128, 4)
    with torch.no_grad():
        conv1.weight.copy_(torch.tensor([127.0, 0.45]).view(2, 1, 1, 1))
        conv1.bias.zero_()
        conv2.weight.zero_()
        conv2.weight[0, 0], conv2.weight[1, 1] = 1 / 127.0, 1 / 0.45
        conv2.bias.zero_()
        w = torch.zeros(4, 2, 8, 8)
        for c in range(4):
            w[c, 0, :4] = (1 if c >= 2 else -1) * 10 / 32  # class bit 1: sign of the upper half
            w[c, 1, 4:] = (1 if c % 2 else -1) * 10 / 32  # class bit 0: sign of the lower half
        head.weight.copy_(w.view(4, 128))
        head.bias.zero_()
    return nn.Sequential(conv1, conv2, nn.Flatten(), head).eval()


def outlier_data(n: int, seed: int):
    X = np.random.default_rng(seed).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    y = 2 * (X[:, 0, :4].mean((1, 2)) > 0) + (X[:, 0, 4:].mean((1, 2)) > 0)
    return X, y.astype(np.int64)


def _setup(tmp_path, target, model, **update):
    return export_for_quantize(tmp_path, model, target, EXAMPLE, **update)


def test_qat_recovers_where_every_ptq_remedy_fails(tmp_path):
    X, y = outlier_data(512, 0)
    Xv, yv = outlier_data(256, 1)
    prof, edir, out = _setup(tmp_path, "x86-onnxruntime-int8", outlier_model(), fallback="fail")
    with torch.no_grad():
        fp32 = float((outlier_model()(torch.as_tensor(Xv)).argmax(1).numpy() == yv).mean())
    assert fp32 == 1.0
    job = QATJob(model=outlier_model, example=EXAMPLE, Xtrain=X, ytrain=y, Xval=Xv, yval=yv, epochs=8, lr=0.01, batch_size=32)
    meta = quantize_stage.run(prof, edir, out, X[:128], Xval=Xv, yval=yv, baseline_accuracy=fp32, max_accuracy_drop=0.35, qat=job)
    *ptq, qat = meta["attempts"]
    assert len(ptq) == 4 and all(not a["within_budget"] and a["drop"] > 0.4 for a in ptq)  # PTQ alone fails the budget
    assert qat["attempt"].startswith("quantization-aware training") and qat["within_budget"] and qat["drop"] < 0.3
    assert meta["decision"] == "int8" and meta["chosen"] == qat["attempt"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # standard QDQ that ONNX Runtime loads
    assert quantize_stage.host_accuracy(prof, out, "int8", Xv, yv) == pytest.approx(qat["accuracy"])


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_method_qat_openvino_writes_fakequantize(tmp_path):
    X = np.random.default_rng(0).standard_normal((48, 1, 8, 8)).astype(np.float32)
    y = np.arange(48) % 3
    prof, edir, out = _setup(tmp_path, "x86-openvino-int8", _tiny())
    prof = prof.model_copy(update={"quantization": prof.quantization.model_copy(update={"method": "qat"})})
    job = QATJob(model=_tiny, example=EXAMPLE, Xtrain=X, ytrain=y, Xval=X, yval=y, epochs=1, lr=0.001, batch_size=16)
    meta = quantize_stage.run(prof, edir, out, X[:16], Xval=X, yval=y, baseline_accuracy=0.0, max_accuracy_drop=1.0, qat=job)
    assert [a["attempt"] for a in meta["attempts"]] == [job.label()]  # method qat: no PTQ attempt
    assert meta["decision"] == "int8" and (out / "model.xml").is_file()
    assert "FakeQuantize" in (out / "model.xml").read_text()


def test_method_qat_without_training_inputs_is_refused(tmp_path):
    from edgebuild.errors import ModelError

    X = np.zeros((8, 1, 8, 8), np.float32)
    prof, edir, out = _setup(tmp_path, "x86-onnxruntime-int8", _tiny())
    prof = prof.model_copy(update={"quantization": prof.quantization.model_copy(update={"method": "qat"})})
    with pytest.raises(ModelError, match="qat"):
        quantize_stage.run(prof, edir, out, X, Xval=X, yval=np.zeros(8, int), baseline_accuracy=0.0, max_accuracy_drop=1.0)


def test_build_with_qat_profile_records_it_in_the_manifest(tiny_project):
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "qat-int8.yaml").write_text("extends: x86-onnxruntime-int8\nquantization: {method: qat}\n")
    p = write_config(tiny_project, targets="[qat-int8]", extra="compress: {quantize: {qat: {epochs: 1}}}\nbudgets: {min_agreement: 0.0}\n")
    Build(load_build_config(p), out=tiny_project / "dist").run()
    m = json.loads((tiny_project / "dist" / "tiny-qat-int8" / "manifest.json").read_text())
    q = m["model"]["quantization"]
    assert m["model"]["precision"] == "int8"
    assert [a["attempt"] for a in q["attempts"]] == ["quantization-aware training (NNCF, 1 epoch)"]
    assert q["epochs"] == 1 and "QDQ" in q["format"]
