"""compress.search.input_sizes: input resolution as a search dimension, real end to end (the
data decoded at that size, BatchNorm recalibrated, exported and timed at it; the chosen
target's whole chain at it), a model that cannot take another size, config errors; and the
search's artifacts for a format that ships another file than the export (ONNX Runtime Mobile)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgebuild.stages import search as search_stage

from conftest import write_config

# a build at 64x64 (the 16x16 images upsampled): 16x16 costs a sixteenth of the MACs
SIZES = "compress:\n  prune: {recover_epochs: 1}\n  search: {prune_ratios: [0.0], precisions: [int8], finalists: 2, benchmark_seconds: 0.3, input_sizes: [[16, 16]]}\n"
FLAT_BACKBONE = """
import torch
from torch import nn

class Flat(nn.Module):  # no global pooling: its head takes exactly 16x16 inputs
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(self.body(x))

def build():
    return Flat()
"""


def _build(root, extra, targets="[x86-onnxruntime-fp32]", size=None):
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    p = write_config(root, targets=targets, epochs=3, extra=extra)
    if size:
        p.write_text(p.read_text().replace("input_size: [16, 16]", f"input_size: [{size}, {size}]"))
    return Build(load_build_config(p), out=root / "dist").run()


def test_a_smaller_input_size_is_chosen_and_the_whole_chain_uses_it(tiny_project):
    from edgebuild.preprocess import load_image
    import onnxruntime as ort

    res = _build(tiny_project, SIZES + "budgets: {max_accuracy_drop: 1.0, min_agreement: 0.0}\n", targets="[x86-onnxruntime-int8]", size=64)
    s = json.loads((tiny_project / "dist" / "search.json").read_text())
    rows = s["groups"][0]["candidates"]
    assert [(r["label"], r["input_size"]) for r in rows] == [("unpruned int8", [64, 64]), ("unpruned int8 @16x16", [16, 16])]
    big, small = rows
    assert 12 * small["macs"] < big["macs"] <= 16 * small["macs"]  # the proxy model ran at 16x16 (the head's MACs do not scale)
    assert small["p50_ms"] < big["p50_ms"] and small["chosen"] and s["groups"][0]["chosen"] == 1
    assert "input 16x16 instead of the build's 64x64" in s["groups"][0]["why"]
    b = tiny_project / "dist" / "tiny-x86-onnxruntime-int8"
    m = json.loads((b / "manifest.json").read_text())
    assert m["model"]["precision"] == "int8"
    # calibrated on the train images decoded at 16x16 (not at the build's 64x64)
    from edgebuild.config import load_build_config
    from edgebuild.data import calibration_indices
    from edgebuild.dataset import prepare

    cfg = load_build_config(tiny_project / "edgebuild.yaml")
    d64 = prepare(cfg, tiny_project / "cache-for-test")
    d16 = d64.at((16, 16))
    idx = calibration_indices(d16.ytrain, 300, 0)
    assert d16.Xtrain[idx].shape[2:] == (16, 16) and d64.Xtrain[idx].shape[2:] == (64, 64)
    assert m["model"]["calibration"]["sha256"] == hashlib.sha256(np.ascontiguousarray(d16.Xtrain[idx]).tobytes()).hexdigest()
    assert m["model"]["inputs"][0]["shape"][1:] == [1, 16, 16] and m["preprocess"]["input_size"] == [16, 16]
    assert m["search"]["chosen"]["input_size"] == [16, 16] and "input 16x16" in m["search"]["input_size"]
    assert m["compression"]["prune"]["ratio"] == 0.0 and m["compression"]["prune"]["recover_epochs"] == 1  # recovered at 16x16
    # the validate accuracy is the artifact's on the val images decoded at 16x16
    sess = ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 16, 16]
    files = sorted((tiny_project / "data" / "val").glob("*/*.png"))
    classes = sorted({f.parent.name for f in files})
    x = np.stack([load_image(f, (16, 16), "grayscale", "stretch", [0.5], [0.5]) for f in files])
    pred = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
    assert m["metrics"]["accuracy"] == pytest.approx(float(np.mean(pred == [classes.index(f.parent.name) for f in files])))
    with np.load(b / "selftest.npz") as d:
        assert d["inputs"].shape[1:] == (1, 16, 16)
    r = subprocess.run([sys.executable, "infer.py", "--selftest"], cwd=b, capture_output=True, text=True)
    assert r.returncode == 0 and "selftest passed" in r.stdout, r.stdout + r.stderr
    t = res.report["targets"]["x86-onnxruntime-int8"]
    assert t["input_size"] == [16, 16]
    html = (tiny_project / "dist" / "report.html").read_text()
    assert "input 16x16 (chosen by the search)" in html and "unpruned int8 @16x16" in html


def test_a_model_that_rejects_another_size_gets_a_failed_candidate(tiny_project):
    (tiny_project / "flat.py").write_text(FLAT_BACKBONE)
    p = write_config(tiny_project, targets="[x86-onnxruntime-fp32]", epochs=2,
                     extra="compress:\n  search: {prune_ratios: [0.0], precisions: [fp32], benchmark_seconds: 0.2, input_sizes: [[8, 8]]}\n"
                           "budgets: {max_accuracy_drop: 1.0, min_agreement: 0.0}\n")
    p.write_text(p.read_text().replace("python:backbone.py:build", "python:flat.py:build").replace("  weights: backbone.safetensors\n", ""))
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    Build(load_build_config(p), out=tiny_project / "dist").run()
    g = json.loads((tiny_project / "dist" / "search.json").read_text())["groups"][0]
    ok, bad = g["candidates"]
    assert bad["input_size"] == [8, 8] and bad["failed"].startswith("the model does not take input 8x8: ") and "p50_ms" not in bad
    assert not bad["pareto"] and not bad["chosen"] and g["failed"] == 1
    assert ok["chosen"] and ok["input_size"] == [16, 16]
    m = json.loads((tiny_project / "dist" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_text())
    assert m["model"]["inputs"][0]["shape"][1:] == [1, 16, 16] and "input_size" not in m["search"]
    assert "failed: the model does not take input 8x8" in (tiny_project / "dist" / "report.html").read_text()


@pytest.mark.parametrize("value, says", [
    ("[[0, 16]]", "between 1 and 8192"),
    ("[[16]]", "not a [height, width] pair"),
    ("[16, 16]", "not a [height, width] pair"),
    ("[[true, 16]]", "not a [height, width] pair"),
    ("[[16.5, 16]]", "not a [height, width] pair"),
    ("160", "a list of [height, width] pairs"),
])
def test_input_sizes_are_validated(tiny_project, cli, value, says):
    p = write_config(tiny_project, extra=f"compress:\n  search: {{input_sizes: {value}}}\n")
    code, out, err = cli("build", p)
    assert code == 2 and err.startswith("error: ") and "compress.search.input_sizes" in err and says in err and "\nhint: " in err
    assert "Traceback" not in err


def test_candidates_and_labels_span_the_input_sizes(tiny_project):
    from edgebuild.config import load_build_config
    from edgebuild.profiles import ProfileRegistry

    p = write_config(tiny_project, extra="compress:\n  search: {prune_ratios: [0.0, 0.5], precisions: [int8], input_sizes: [[12, 12], [16, 16]]}\n")
    cfg = load_build_config(p)
    prof = ProfileRegistry([]).get("x86-onnxruntime-int8")
    cs = search_stage.candidates(cfg, prof)
    assert [search_stage.label(c) for c in cs] == ["unpruned int8", "unpruned int8 @12x12", "prune 50% l2/uniform int8", "prune 50% l2/uniform int8 @12x12"]
    assert "input_size" not in cs[0]  # the build's size: the same cache key as before sizes were searched
    assert search_stage.prune_config(cfg, cs[0], 1) is None and search_stage.prune_config(cfg, cs[1], 1).ratio == 0.0  # recovery at 12x12
    assert cfg.at_input_size((12, 12)).preprocess.input_size == (12, 12) and cfg.preprocess.input_size == (16, 16)


def test_ort_format_candidates_keep_what_the_export_stage_keeps(tmp_path):
    """An ONNX Runtime Mobile profile ships model.ort; an fp32/fp16 candidate's folder holds every
    file the export writes (the .ort, its ONNX source and the usability report), as int8 ones do,
    and runs on this host."""
    import torch
    from torch import nn
    from edgebuild.profiles import ProfileRegistry
    from edgebuild.runtimes import adapter

    prof = ProfileRegistry([]).get("android-arm64-onnxruntime-mobile-int8")
    assert prof.format == "ort"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    X = np.random.default_rng(0).standard_normal((24, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        y = m(torch.as_tensor(X)).argmax(1).numpy()
    for precision in ("fp32", "int8"):
        with tempfile.TemporaryDirectory(dir=tmp_path) as t:
            art = Path(t)
            ran = search_stage.artifact(m, torch.zeros(1, 1, 16, 16), prof, precision, X, art)
            kept = adapter("onnxruntime").artifact_files(prof.model_copy(update={"precision": ran}))
            assert set(kept) <= {f.name for f in art.iterdir()}, (precision, sorted(f.name for f in art.iterdir()))
            r = search_stage.measure(prof, art, ran, X, y, 0.1)
            assert r["latency_source"].startswith("estimate") and r["size_bytes"] > 0
            if precision == "fp32":
                assert r["accuracy"] == 1.0  # the .ort file is the model, unchanged
