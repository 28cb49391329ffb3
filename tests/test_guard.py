"""The int8 accuracy guard on a model built so that plain int8 fails and the first remedy
(first conv and head kept in float) passes, deterministically.

The model is a matched filter: one 8x8 convolution whose three kernels are orthogonal,
zero-mean +-1 patterns, then an identity 1x1 convolution and an identity head. An image of class k is a large per-image offset
(-1000..1000) plus 0.1 times pattern k. In float the offset cancels (zero-mean kernels) and
logit k is 0.1 * 64 = 6.4, the others 0, so fp32 accuracy is 1.0. Plain int8 quantizes the
input with one uint8 scale over about 2000 (a step of ~8): the 0.1 signal is lost and the
accuracy falls to about chance. Keeping the first conv in float keeps the input in float, and
its output (0..6.4) quantizes well. Every expected accuracy is computed here with numpy or by
running the shipped file in ONNX Runtime directly, never through the guard.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgebuild.stages import quantize as quantize_stage

from conftest import export_for_quantize

N = 60


def patterns() -> np.ndarray:
    i, j = np.mgrid[0:8, 0:8]
    return np.stack([np.where(i < 4, 1.0, -1.0), np.where(j < 4, 1.0, -1.0), np.where((i + j) % 2 == 0, 1.0, -1.0)]).astype(np.float32)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(N) % 3
    offsets = rng.uniform(-1000, 1000, N).astype(np.float32)
    X = offsets[:, None, None] + np.float32(0.1) * patterns()[y]
    return X[:, None].astype(np.float32), y


def model() -> nn.Module:
    conv = nn.Conv2d(1, 3, 8, bias=False)
    mid = nn.Conv2d(3, 3, 1, bias=False)  # identity; the layer a remedy leaves in int8
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(patterns()[:, None]))
        mid.weight.copy_(torch.eye(3)[:, :, None, None])
        head.weight.copy_(torch.eye(3))
    return nn.Sequential(conv, nn.ReLU(), mid, nn.Flatten(), head).eval()


def onnx_accuracy(path, X, y) -> float:
    """The file's accuracy, run by ONNX Runtime here (not through edgebuild's runners)."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: X[i : i + 1]})[0] for i in range(len(X))])
    return float((logits.argmax(1) == y).mean())


@pytest.fixture
def exported(tmp_path):
    def make(**update):
        return export_for_quantize(tmp_path, model(), "x86-onnxruntime-int8", **update)
    return make


def test_the_construction_is_what_the_test_needs():
    """By hand, in numpy: the float model is exact; one uint8 step over the input range is far
    larger than the signal."""
    X, y = data()
    logits = X.reshape(N, 64) @ patterns().reshape(3, 64).T
    assert float((logits.argmax(1) == y).mean()) == 1.0
    np.testing.assert_allclose(logits.max(1), 6.4, atol=0.05)
    assert (X.max() - X.min()) / 255 > 50 * 0.1


def test_plain_fails_first_remedy_passes_and_ships(exported):
    prof, edir, out = exported()
    X, y = data()
    assert onnx_accuracy(edir / "model.onnx", X, y) == 1.0  # the fp32 file, the guard's baseline
    meta = quantize_stage.run(prof, edir, out, X, Xval=X, yval=y, baseline_accuracy=1.0, max_accuracy_drop=0.0)
    names = [a["attempt"] for a in meta["attempts"]]
    assert names == ["plain", "first conv and head in float"]
    plain, remedy = meta["attempts"]
    assert plain["accuracy"] < 0.6 and plain["within_budget"] is False  # scored on the int8 file, not the fp32 one
    assert remedy["accuracy"] == 1.0 and remedy["drop"] == 0.0
    assert remedy["within_budget"] is True  # a drop equal to the budget is within it
    assert meta["decision"] == "int8" and meta["effective_precision"] == "int8"
    assert meta["chosen"] == "first conv and head in float" and meta["accuracy"] == 1.0
    # the file shipped is the chosen attempt's: int8, its first conv fed by the float input
    shipped = out / "model.onnx"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert onnx_accuracy(shipped, X, y) == 1.0
    g = onnx.load(str(shipped))
    ops = [n.op_type for n in g.graph.node]
    assert "QuantizeLinear" in ops  # still an int8 model (the middle conv)
    conv = next(n for n in g.graph.node if n.op_type == "Conv")
    assert conv.input[0] == g.graph.input[0].name  # not quantized: straight from the float input


def test_fail_fallback_keeps_the_best_attempt(exported):
    """Every attempt over an unreachable budget with fallback 'fail': the most accurate attempt
    is kept and reported (not the first, not the worst)."""
    prof, edir, out = exported(fallback="fail")
    X, y = data()
    meta = quantize_stage.run(prof, edir, out, X, Xval=X, yval=y, baseline_accuracy=1.5, max_accuracy_drop=0.0)
    accs = [a["accuracy"] for a in meta["attempts"]]
    assert len(accs) >= 3 and min(accs) < 0.6 and max(accs) == 1.0
    assert meta["decision"] == "fail"
    assert meta["accuracy"] == 1.0
    assert meta["chosen"] == meta["attempts"][accs.index(1.0)]["attempt"] != "plain"
    assert onnx_accuracy(out / "model.onnx", X, y) == 1.0
    rows = quantize_stage.guard_gate_rows("t", meta)
    assert rows[0]["verdict"] == "FAIL" and rows[0]["measured"] == 0.5  # 1.5 - 1.0, by hand
