"""The shipped example end to end: bundles, stubs, manifest, not-run targets, cache."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import EXAMPLE

pytestmark = pytest.mark.slow


def bundle(example_build, target):
    return example_build["out"] / f"digits-5to9-{target}"


def test_bundles_and_layout(example_build):
    out = example_build["out"]
    for t in ("x86-onnxruntime-fp32", "x86-onnxruntime-int8", "x86-openvino-int8", "rpi-aarch64-onnxruntime-int8"):
        b = bundle(example_build, t)
        for f in ("manifest.json", "labels.txt", "infer.py", "requirements.txt", "README.md", "selftest.npz"):
            assert (b / f).is_file(), (t, f)
        assert (out / f"{b.name}.tar.gz").is_file() and (out / f"{b.name}.tar.gz.sha256").is_file()
    assert (bundle(example_build, "x86-openvino-int8") / "model.xml").is_file()
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    assert (bundle(example_build, "x86-onnxruntime-fp32") / "labels.txt").read_text().split() == ["eight", "five", "nine", "seven", "six"]


def test_manifest_records_accuracy_parity_sizes(example_build):
    m = json.loads((bundle(example_build, "x86-onnxruntime-fp32") / "manifest.json").read_text())
    assert m["schema"] == "edgebuild.bundle/1" and m["name"] == "digits-5to9"
    met = m["metrics"]
    assert met["status"] == "measured"
    assert met["accuracy"] >= 0.9 and met["agreement"] == 1.0 and met["max_abs_diff"] < 1e-3
    assert met["latency_p50_ms"] > 0 and met["size_bytes"] > 0 and met["macs"] > 0 and met["params"] > 0
    assert m["model"]["inputs"][0] == {"name": "input", "shape": ["N", 1, 32, 32], "dtype": "float32", "layout": "NCHW"}
    prov = m["provenance"]
    assert len(prov["config_sha256"]) == 64 and len(prov["backbone_weights_sha256"]) == 64 and prov["seed"] == 0
    assert prov["packages"]["torch"] and prov["packages"]["onnxruntime"]
    assert set(m["files"]) >= {"model.onnx", "labels.txt", "infer.py", "requirements.txt", "README.md", "selftest.npz"}


def test_absent_target_is_not_run_with_reason(example_build):
    m = json.loads((bundle(example_build, "rpi-aarch64-onnxruntime-int8") / "manifest.json").read_text())
    assert m["metrics"]["status"] == "not run"
    assert "aarch64" in m["metrics"]["reason"]
    assert all(g["verdict"] == "not run" for g in m["metrics"]["gates"])
    report = json.loads((example_build["out"] / "report.json").read_text())
    assert report["targets"]["rpi-aarch64-onnxruntime-int8"]["status"] == "not run"


def test_int8_host_targets_measured(example_build):
    for t in ("x86-onnxruntime-int8", "x86-openvino-int8"):
        m = json.loads((bundle(example_build, t) / "manifest.json").read_text())
        assert m["metrics"]["status"] == "measured", t
        assert m["model"]["calibration"]["samples"] > 0
        fp32 = m["metrics"]["fp32_reference_accuracy"]
        assert m["metrics"]["accuracy"] >= fp32 - 0.02, t


@pytest.mark.parametrize("target", ["x86-onnxruntime-fp32", "x86-onnxruntime-int8", "x86-openvino-int8"])
def test_infer_py_classifies_val_image_like_the_reference(example_build, target):
    b = bundle(example_build, target)
    img = sorted((EXAMPLE / "data" / "val" / "seven").glob("*.png"))[0]
    r = subprocess.run([sys.executable, str(b / "infer.py"), str(img), "--json", "--top-k", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res[0]["top"][0]["label"] == "seven" and len(res[0]["top"]) == 2
    # same top-1 as the PyTorch reference of the transferred model
    from edgebuild.config import load_build_config
    from edgebuild.data import load_image
    from edgebuild.stages import transfer
    import torch

    cfg = load_build_config(EXAMPLE / "edgebuild.yaml")
    entry = next(p for p in (example_build["cache"] / "transfer").iterdir() if not p.name.startswith("."))  # not a .KEY.lock
    model = transfer.load_model(cfg, entry)
    ref = model(torch.from_numpy(load_image(img, cfg.preprocess)[None])).argmax(1).item()
    labels = (b / "labels.txt").read_text().splitlines()
    assert labels[ref] == res[0]["top"][0]["label"]
    r = subprocess.run([sys.executable, str(b / "infer.py"), "--selftest"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "selftest passed" in r.stdout, r.stderr


def test_rebuild_is_fully_cached(example_build, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEBUILD_CACHE_DIR", str(example_build["cache"]))
    code, out, err = cli("build", EXAMPLE / "edgebuild.yaml", "-o", tmp_path / "d", "--json",
                         "-t", "x86-onnxruntime-fp32", "-t", "x86-onnxruntime-int8", "-t", "x86-openvino-int8", "-t", "rpi-aarch64-onnxruntime-int8")
    assert code == 0, err
    report = json.loads(out)
    assert all(s["cached"] for s in report["plan"]), report["plan"]
    a = (example_build["out"] / "digits-5to9-x86-onnxruntime-int8.tar.gz").read_bytes()
    b = (tmp_path / "d" / "digits-5to9-x86-onnxruntime-int8.tar.gz").read_bytes()
    assert a == b
