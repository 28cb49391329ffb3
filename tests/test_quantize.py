"""The int8 accuracy guard: remedies in order, every attempt recorded, the profile's fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild.errors import GateFailed
from edgebuild.stages import quantize as quantize_stage

from conftest import export_for_quantize, write_config


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def _data(n=48):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    return X, np.arange(n) % 3


def _exported(tmp_path, target, **update):
    return export_for_quantize(tmp_path, _tiny(), target, **update)


def test_plain_when_within_budget(tmp_path):
    prof, edir, out = _exported(tmp_path, "x86-onnxruntime-int8")
    X, y = _data()
    meta = quantize_stage.run(prof, edir, out, X, Xval=X, yval=y, baseline_accuracy=0.0, max_accuracy_drop=0.5)
    assert meta["decision"] == "int8" and meta["effective_precision"] == "int8"
    assert [a["attempt"] for a in meta["attempts"]] == ["plain"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_guard_tries_remedies_then_falls_back_to_fp32(tmp_path):
    prof, edir, out = _exported(tmp_path, "x86-onnxruntime-int8")  # fallback: fp32
    X, y = _data()
    logs = []
    # an unreachable baseline forces every int8 attempt over the budget
    meta = quantize_stage.run(prof, edir, out, X, Xval=X, yval=y, baseline_accuracy=1.5, max_accuracy_drop=0.0, log=logs.append)
    names = [a["attempt"] for a in meta["attempts"]]
    assert names[0] == "plain" and names[1] == "first conv and head in float"
    assert any("entropy" in n for n in names) and any("percentile" in n for n in names)
    assert names[-1].startswith("fallback fp32")
    assert meta["attempts"][1]["excluded_nodes"]  # first conv and head really excluded
    assert all("accuracy" in a for a in meta["attempts"])
    assert meta["decision"] == "fallback-fp32" and meta["effective_precision"] == "fp32"
    assert (out / "model.onnx").read_bytes() == (edir / "model.onnx").read_bytes()
    assert not list(out.glob(".attempt-*"))
    assert any("falling back to fp32" in line for line in logs)


def test_fallback_fail_is_a_failed_gate(tmp_path):
    prof, edir, out = _exported(tmp_path, "x86-onnxruntime-int8", fallback="fail")
    X, y = _data()
    meta = quantize_stage.run(prof, edir, out, X, Xval=X, yval=y, baseline_accuracy=1.5, max_accuracy_drop=0.0)
    assert meta["decision"] == "fail" and meta["effective_precision"] == "int8"
    rows = quantize_stage.guard_gate_rows("t", meta)
    assert rows and rows[0]["verdict"] == "FAIL"


def _blocks(k=6):
    """Exact in fp32; each of ``k`` blocks carries its signal beside a 280x larger channel, so
    int8 is right only once every block's second convolution is back in float."""
    layers = []
    for _ in range(k):
        a, b = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            a.weight.copy_(torch.tensor([127.0, 0.45]).view(2, 1, 1, 1))
            b.weight.copy_(torch.tensor([0.0, 1 / 0.45]).view(1, 2, 1, 1))
            a.bias.zero_(), b.bias.zero_()
        layers += [a, b]
    head = nn.Linear(64, 4)
    with torch.no_grad():
        head.bias.zero_()
        for c in range(4):  # the class: signs of the upper and the lower half of the image
            w = torch.zeros(8, 8)
            w[:4], w[4:] = (1 if c >= 2 else -1) / 32, (1 if c % 2 else -1) / 32
            head.weight[c] = w.flatten()
    return nn.Sequential(*layers, nn.Flatten(), head).eval()


def _halves(n=64):
    X = np.random.default_rng(0).uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32)
    return X, (2 * (X[:, 0, :4].mean((1, 2)) > 0) + (X[:, 0, 4:].mean((1, 2)) > 0)).astype(np.int64)


@pytest.mark.parametrize("max_reverted", [0.25, 1.0])
def test_openvino_guard_uses_ignored_scope_and_accuracy_control_within_max_reverted(tmp_path, max_reverted):
    prof, edir, out = export_for_quantize(tmp_path, _blocks(), "x86-openvino-int8")
    prof = prof.model_copy(update={"quantization": prof.quantization.model_copy(update={"max_reverted": max_reverted})})
    X, y = _halves()
    logs = []
    meta = quantize_stage.run(prof, edir, out, X[:32], Xval=X, yval=y, min_agreement=0.99, log=logs.append)
    names = [a["attempt"] for a in meta["attempts"]]
    assert names[:2] == ["plain", "first conv and head in float"] and meta["attempts"][1]["ignored"]
    assert all(a["agreement"] < 0.5 for a in meta["attempts"][:3])  # PTQ loses every block's signal
    ac = next(a for a in meta["attempts"] if a["attempt"] == "NNCF accuracy-controlled quantization")
    assert ac["max_iterations"] == int(max_reverted * 13)  # 12 convolutions and the head
    assert ac["agreement"] >= 0.95 and ac["float_share"] > 0.25  # accuracy back, by giving most quantizers to float
    assert any(line.startswith("    NNCF: Reverted") for line in logs)  # its steps are the build's progress
    if max_reverted < ac["float_share"]:  # not an int8 model: the guard moves on to the fallback
        assert not ac["within_budget"] and meta["decision"] == "fallback-fp32"
        assert any("back in float" in line for line in logs)
    else:
        assert ac["within_budget"] and meta["decision"] == "int8"


def _force_int8_loss(monkeypatch):
    """Every int8 attempt (PTQ remedies and QAT alike) scores as if it always predicted one class."""
    real = quantize_stage.host_logits

    def fake(profile, artifact, precision, X):
        out = real(profile, artifact, precision, X)
        if precision == "int8":
            out = np.zeros_like(out)
            out[:, 0] = 1.0
        return out

    monkeypatch.setattr(quantize_stage, "host_logits", fake)


def test_pipeline_records_fallback_in_manifest(tiny_project, monkeypatch):
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    _force_int8_loss(monkeypatch)
    p = write_config(tiny_project, targets="[x86-onnxruntime-int8]", extra="budgets: {max_accuracy_drop: 0.05}\n")
    res = Build(load_build_config(p), out=tiny_project / "dist").run()
    m = json.loads((tiny_project / "dist" / "tiny-x86-onnxruntime-int8" / "manifest.json").read_text())
    assert m["model"]["precision"] == "fp32" and m["model"]["requested_precision"] == "int8"
    q = m["model"]["quantization"]
    assert q["decision"] == "fallback-fp32" and len(q["attempts"]) >= 4
    assert m["model"]["calibration"]["samples"] > 0
    t = res.report["targets"]["x86-onnxruntime-int8"]
    assert t["precision"] == {"requested": "int8", "effective": "fp32"}


def test_pipeline_fallback_fail_exits_3(tiny_project, monkeypatch, cli):
    _force_int8_loss(monkeypatch)
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "strict-int8.yaml").write_text("extends: x86-onnxruntime-int8\nfallback: fail\n")
    p = write_config(tiny_project, targets="[strict-int8]", extra="budgets: {max_accuracy_drop: 0.05}\n")
    code, out, err = cli("build", p, "-o", tiny_project / "dist")
    assert code == 3
    assert "int8 accuracy guard" in out + err
    assert not (tiny_project / "dist" / "tiny-strict-int8").exists()
    report = json.loads((tiny_project / "dist" / "failed-report.json").read_text())  # beside dist/, never over the published one
    assert report["status"] == "failed"
    assert not (tiny_project / "dist" / "report.json").exists()  # nothing was ever published there
