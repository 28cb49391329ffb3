"""The edge runtimes beyond ONNX Runtime/OpenVINO: LiteRT and ExecuTorch bundles built from the
digits example run in a fresh venv holding only their requirements and classify its images;
Core ML converts and says why it was not run; ONNX Runtime Mobile writes .ort plus
required_operators.config and the mobile-usability report; a missing extra or missing qemu is
exit 2 naming what to install. The aarch64 bundles under qemu-user are in the emulated test
(make test-emulated).

One build of the example for all these targets (session fixture, private cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "digits"
NAME = "digits-5to9"
HOST = ["x86-litert-int8", "x86-executorch-xnnpack-int8"]
OTHER = ["ios-coreml-fp16", "android-arm64-onnxruntime-mobile-int8"]


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, encoding="utf-8", **kw)


def sample_images() -> list[Path]:
    val = EXAMPLE / "data" / "val"
    return [sorted((val / c).iterdir())[0] for c in sorted(os.listdir(val))]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(root / "cache"))
    targets = [a for t in HOST + OTHER for a in ("-t", t)]
    r = run([sys.executable, "-m", "edgebuild", "build", EXAMPLE / "edgebuild.yaml", "-o", root / "dist", *targets], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "dist"


@pytest.mark.slow
@pytest.mark.parametrize("target", HOST)
def test_host_runtime_bundle_in_fresh_venv(dist, tmp_path, target):
    b = dist / f"{NAME}-{target}"
    m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    assert m["metrics"]["status"] == "measured" and m["metrics"]["agreement"] >= 0.95
    assert m["model"]["precision"] == "int8" and m["model"]["quantization"]["decision"] == "int8"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(tmp_path / "venv")
    py = tmp_path / "venv" / "bin" / "python"
    r = run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", b / "requirements.txt"], timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    # only the bundle's requirements: no edgebuild, no converter
    r = run([py, "-c", "import importlib.util as u; print([m for m in ('edgebuild', 'litert_torch', 'onnx', 'onnxruntime') if u.find_spec(m)])"], cwd=b)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = run([py, "infer.py", "--selftest"], cwd=b)
    assert r.returncode == 0 and "selftest passed" in r.stdout, r.stdout + r.stderr
    images = sample_images()
    r = run([py, "infer.py", *images, "--json"], cwd=b)
    assert r.returncode == 0, r.stderr
    top = [res["top"][0]["label"] for res in json.loads(r.stdout)]
    assert sum(t == p.parent.name for t, p in zip(top, images)) >= len(images) - 1, top


@pytest.mark.slow
def test_coreml_converts_and_says_why_not_run(dist):
    b = dist / f"{NAME}-ios-coreml-fp16"
    pkg = b / "model.mlpackage"
    import coremltools as ct

    spec = ct.utils.load_spec(str(pkg))  # the ML Program itself, read without running it
    assert spec.WhichOneof("Type") == "mlProgram"
    assert [i.name for i in spec.description.input] == ["input"] and list(spec.description.input[0].type.multiArrayType.shape) == [1, 1, 32, 32]
    assert [o.name for o in spec.description.output] == ["logits"]
    m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    assert m["metrics"]["status"] == "not run" and m["metrics"]["reason"].startswith("needs macOS")
    assert m["selftest_reference"].startswith("PyTorch reference")
    assert m["model"]["format"] == "mlpackage" and m["model"]["precision"] == "fp16"
    readme = (b / "README.md").read_text(encoding="utf-8")
    assert "import CoreML" in readme and "let MEAN: [Float] = [0.5]" in readme and "not compiled or run here" in readme
    assert "coremltools==" in (b / "requirements.txt").read_text()
    r = run([sys.executable, "infer.py", "--selftest"], cwd=b)  # off macOS: a clear failure, no traceback
    assert r.returncode == 1 and "Core ML runs only on macOS" in r.stderr and "Traceback" not in r.stderr
    # the weights are fp16: the blob is about two bytes per parameter
    weights = next(pkg.rglob("weight.bin"))
    assert 1.5 * m["metrics"]["params"] < weights.stat().st_size < 3 * m["metrics"]["params"], (weights.stat().st_size, m["metrics"]["params"])


@pytest.mark.slow
def test_ort_mobile_format_and_usability_report(dist):
    import onnxruntime as ort

    b = dist / f"{NAME}-android-arm64-onnxruntime-mobile-int8"
    assert not (b / "model.onnx").exists()
    ops = (b / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "QuantizeLinear" in ops and "/tmp" not in ops
    m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    rep = m["model"]["mobile_usability"]
    assert rep["NNAPI"]["coverage"] == 1.0 and rep["NNAPI"]["try_ep"] == "YES"
    assert rep["CoreML MLProgram"]["coverage"] < 0.5 and "ai.onnx:QuantizeLinear" in rep["CoreML MLProgram"]["unsupported_ops"]
    assert m["metrics"]["status"] == "not run" and "aarch64" in m["metrics"]["reason"]
    # the .ort file runs in the full ONNX Runtime and gives the golden outputs exactly
    with np.load(b / "selftest.npz") as d:
        x, expected = d["inputs"], d["outputs"]
    s = ort.InferenceSession(str(b / "model.ort"), providers=["CPUExecutionProvider"])
    got = np.concatenate([s.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.array_equal(got, expected)
    readme = (b / "README.md").read_text(encoding="utf-8")
    assert "import ai.onnxruntime.OrtSession" in readme and "val MEAN = floatArrayOf(0.5f)" in readme


def test_missing_extra_is_refused_naming_it(tmp_path):
    code = ("import sys; sys.modules['litert_torch'] = None; from edgebuild.cli import main_entry; "
            f"sys.argv = ['edgebuild', 'build', {str(EXAMPLE / 'edgebuild.yaml')!r}, '-o', {str(tmp_path / 'dist')!r}, '-t', 'x86-litert-int8']; main_entry()")
    r = run([sys.executable, "-c", code], env=dict(os.environ, EDGEBUILD_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 2, r.stderr
    assert "error: target 'x86-litert-int8' needs the 'litert' extra" in r.stderr
    assert "hint: pip install 'edgebuild[litert]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "dist").exists()


def test_emulate_without_qemu_is_exit_2_with_hint(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), EDGEBUILD_CACHE_DIR=str(tmp_path / "cache"))  # no qemu, debootstrap or unshare
    r = run([sys.executable, "-m", "edgebuild", "build", EXAMPLE / "edgebuild.yaml", "-o", tmp_path / "dist", "--emulate",
             "-t", "rpi-aarch64-onnxruntime-int8"], env=env)
    assert r.returncode == 2, r.stderr
    assert "error: --emulate needs qemu-user-static and debootstrap" in r.stderr and "hint: sudo apt-get install qemu-user-static debootstrap" in r.stderr


@pytest.mark.parametrize("runtime,fmt,extra", [("litert", "tflite", {"batch": "dynamic"}), ("executorch", "onnx", {}), ("coreml", "mlpackage", {"precision": "int4"})])
def test_profile_rules_for_new_runtimes(runtime, fmt, extra):
    from pydantic import ValidationError

    from edgebuild.config import TargetProfile

    with pytest.raises(ValidationError):
        TargetProfile.model_validate({"name": "t", "runtime": runtime, "format": fmt, **extra})
    ok = {"litert": "tflite", "executorch": "pte", "coreml": "mlpackage"}[runtime]
    assert TargetProfile.model_validate({"name": "t", "runtime": runtime, "format": ok}).format == ok


# ------------------------------------------------------------------ aarch64 under qemu-user
def _shared_root() -> str:
    """The arm64 root lives in the user's edgebuild cache, made once; tests reuse it."""
    from edgebuild.emulate import SUITE

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("EDGEBUILD_EMULATION_ROOT") or os.path.join(base, "edgebuild", "emulation", f"debian-{SUITE}-arm64")


@pytest.mark.emulated
@pytest.mark.slow
def test_aarch64_bundles_validated_under_emulation(tmp_path):
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(tmp_path / "cache"), EDGEBUILD_EMULATION_ROOT=_shared_root())
    targets = ["rpi-aarch64-onnxruntime-int8", "android-arm64-litert-int8"]
    r = run([sys.executable, "-m", "edgebuild", "build", EXAMPLE / "edgebuild.yaml", "-o", tmp_path / "dist", "--emulate",
             *[a for t in targets for a in ("-t", t)]], env=env, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for t in targets:
        m = json.loads((tmp_path / "dist" / f"{NAME}-{t}" / "manifest.json").read_text(encoding="utf-8"))["metrics"]
        assert m["status"] == "emulated" and m["validated"] == "emulated (qemu-user, aarch64)"
        assert m["emulation"]["machine"] == "aarch64" and m["selftest"] == "passed"
        assert m["accuracy"] > 0.9 and m["agreement"] > 0.95
        assert m["latency"] == "not measured (emulated)" and "latency_p50_ms" not in m
        assert all("latency" not in g["budget"] or g["verdict"] != "pass" for g in m["gates"])
    r = run([sys.executable, "-m", "edgebuild", "validate", "--emulate", "--json", tmp_path / "dist" / f"{NAME}-rpi-aarch64-onnxruntime-int8.tar.gz"], env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["selftest"] == "passed" and out["golden_agreement"] == 1.0 and out["benchmark"] is None
