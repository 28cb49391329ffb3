"""ONNX export (static/dynamic batch, checker, one file) and OpenVINO conversion with parity."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgebuild.errors import ModelError
from edgebuild.profiles import ProfileRegistry
from edgebuild.runtimes import open_runner
from edgebuild.stages import export


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("target,batch", [("x86-onnxruntime-fp32", "dynamic"), ("x86-onnxruntime-int8", 1), ("x86-openvino-fp32", 1), ("x86-openvino-fp16", 1)])
def test_export_parity(tmp_path, target, batch):
    prof = ProfileRegistry().get(target)
    assert prof.batch == batch
    m = model()
    ex = torch.zeros(1, 3, 24, 24)
    meta = export.run(m, ex, prof, tmp_path)
    assert meta["opset"] >= 18 and not list(tmp_path.glob("*.data"))
    if prof.format == "onnx":
        g = onnx.load(str(tmp_path / "model.onnx"))
        dim0 = g.graph.input[0].type.tensor_type.shape.dim[0]
        assert (dim0.dim_param != "") == (batch == "dynamic")
    x = np.random.default_rng(0).standard_normal((5, 3, 24, 24)).astype(np.float32)
    got = open_runner(prof, tmp_path).run(x)
    ref = m(torch.from_numpy(x)).detach().numpy()
    tol = 5e-2 if prof.precision == "fp16" else 1e-4
    np.testing.assert_allclose(got, ref, atol=tol)


def test_openvino_runner_sets_precision_explicitly(tmp_path):
    prof = ProfileRegistry().get("x86-openvino-fp32")
    export.run(model(), torch.zeros(1, 3, 16, 16), prof, tmp_path)
    r = open_runner(prof, tmp_path)
    assert r.settings["inference_precision"] == "f32"
    assert r.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_unconvertible_op_names_the_op(tmp_path):
    class Weird(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x.flatten(1).reshape(-1, 4, 4)).S.reshape(x.shape[0], -1)

    prof = ProfileRegistry().get("x86-onnxruntime-fp32")
    with pytest.raises(ModelError, match="ONNX export failed"):
        export.run(Weird(), torch.zeros(1, 1, 4, 4), prof, tmp_path)
