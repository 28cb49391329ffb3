"""Done-when for deployable bundles: every built-in host profile's bundle runs its Python stub
in a fresh virtual environment holding only the bundle's requirements, passes --selftest and
classifies an image; the OpenVINO C++ stub compiles with CMake and agrees with the Python stub;
a tampered selftest.npz or model fails the self-test; `edgebuild validate` runs here.

Expensive parts are shared: ONE build of the example for all host targets (session fixture,
private cache) and ONE plain venv per runtime (not per target).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "digits"
HOST_TARGETS = ["x86-onnxruntime-fp32", "x86-onnxruntime-int8", "x86-openvino-fp32", "x86-openvino-fp16", "x86-openvino-int8"]
OV_TARGETS = [t for t in HOST_TARGETS if "openvino" in t]
NAME = "digits-5to9"

pytestmark = pytest.mark.slow


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, encoding="utf-8", **kw)


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    root = tmp_path_factory.mktemp("stubs")
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(root / "cache"))
    targets = [a for t in HOST_TARGETS for a in ("-t", t)]
    r = run([sys.executable, "-m", "edgebuild", "build", EXAMPLE / "edgebuild.yaml", "-o", root / "dist", *targets], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "dist"


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory, dist):
    """A plain venv per runtime (no system site-packages) with ONLY a bundle's requirements.txt."""
    made: dict[str, Path] = {}

    def get(runtime: str) -> Path:
        if runtime not in made:
            where = tmp_path_factory.mktemp(f"venv-{runtime}")
            venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(where)
            py = where / "bin" / "python"
            req = dist / f"{NAME}-{'x86-onnxruntime-fp32' if runtime == 'onnxruntime' else 'x86-openvino-fp32'}" / "requirements.txt"
            r = run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", req], timeout=600)
            assert r.returncode == 0, r.stdout + r.stderr
            made[runtime] = py
        return made[runtime]

    return get


def bundle(dist: Path, target: str) -> Path:
    return dist / f"{NAME}-{target}"


def sample_images() -> list[Path]:
    val = EXAMPLE / "data" / "val"
    return [sorted((val / c).iterdir())[0] for c in sorted(os.listdir(val))]


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_python_stub_in_fresh_venv(dist, runtime_venv, target):
    b = bundle(dist, target)
    runtime = "onnxruntime" if "onnxruntime" in target else "openvino"
    py = runtime_venv(runtime)
    # the venv holds only the bundle's requirements: no edgebuild, no torch
    r = run([py, "-c", "import importlib.util as u; print([m for m in ('edgebuild', 'torch', 'onnx') if u.find_spec(m)])"], cwd=b)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    req = (b / "requirements.txt").read_text()
    manifest = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    assert f"{runtime}=={manifest['provenance']['packages'][runtime]}" in req
    r = run([py, "infer.py", "--selftest"], cwd=b)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selftest passed" in r.stdout
    images = sample_images()
    r = run([py, "infer.py", *images, "--json", "--top-k", "2"], cwd=b)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    labels = (b / "labels.txt").read_text(encoding="utf-8").splitlines()
    host = json.loads(run([sys.executable, "infer.py", *images, "--json", "--top-k", "2"], cwd=b).stdout)
    assert [res["top"][0]["label"] for res in results] == [res["top"][0]["label"] for res in host]
    assert sum(res["top"][0]["label"] == p.parent.name for res, p in zip(results, images)) >= len(images) - 1
    assert all(t["label"] == labels[t["index"]] for res in results for t in res["top"])


@pytest.fixture(scope="session")
def cpp_builds(dist, runtime_venv, tmp_path_factory):
    """Compile each OpenVINO bundle's C++ stub against the fresh venv's openvino wheel."""
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("cmake or a C++ compiler is missing")
    py = runtime_venv("openvino")
    ov_cmake = run([py, "-c", "import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), 'cmake'))"]).stdout.strip()
    exes = {}
    for target in OV_TARGETS:
        b = bundle(dist, target)
        build = tmp_path_factory.mktemp(f"cpp-{target}")
        r = run(["cmake", "-S", b / "cpp", "-B", build, f"-DOpenVINO_DIR={ov_cmake}"])
        assert r.returncode == 0, r.stdout + r.stderr
        r = run(["cmake", "--build", build, "-j2"])
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        exes[target] = build / "infer"
    return exes


@pytest.mark.parametrize("target", OV_TARGETS)
def test_cpp_stub_matches_python_stub(dist, runtime_venv, cpp_builds, target):
    b = bundle(dist, target)
    images = sample_images()
    r = run([cpp_builds[target], *images, "--json", "--top-k", "5", "--bundle", b])
    assert r.returncode == 0, r.stderr
    cpp = json.loads(r.stdout)
    r = run([runtime_venv("openvino"), "infer.py", *images, "--json", "--top-k", "5"], cwd=b)
    py = json.loads(r.stdout)
    worst = 0.0
    for c, p in zip(cpp, py):
        assert c["top"][0]["label"] == p["top"][0]["label"]
        sc = {t["label"]: t["score"] for t in c["top"]}
        worst = max(worst, max(abs(sc[t["label"]] - t["score"]) for t in p["top"]))
    print(f"{target}: C++ vs Python max score diff {worst:.3g}")
    assert worst < 1e-5
    # plain text output, bundle found from the executable's location is not required: --bundle given
    r = run([cpp_builds[target], images[0], "--bundle", b])
    assert r.stdout.startswith(f"{images[0]}: {py[0]['top'][0]['label']} ")
    # preprocessing: the C++ tensor is the Python stub's, bit for bit, on the example's images
    out = b.parent / f"x-{target}.f32"
    r = run([cpp_builds[target], "--dump-input", out, images[0]])
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(REPO))
    from edgebuild.preprocess import load_image

    m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))["preprocess"]
    ref = load_image(images[0], m["input_size"], m["color"], m["resize"], m["mean"], m["std"])
    assert np.array_equal(np.fromfile(out, np.float32).reshape(ref.shape), ref)
    out.unlink()


@pytest.mark.parametrize("what", ["selftest", "model"])
def test_tampered_bundle_fails_selftest(dist, tmp_path, what):
    src = bundle(dist, "x86-onnxruntime-fp32")
    b = tmp_path / src.name
    shutil.copytree(src, b)
    if what == "selftest":
        with np.load(b / "selftest.npz") as d:
            arrays = {k: d[k] for k in d.files}
        arrays["outputs"] = arrays["outputs"] + 1.0
        np.savez(b / "selftest.npz", **arrays)
    else:
        data = bytearray((b / "model.onnx").read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # zero a run of weights
        (b / "model.onnx").write_bytes(bytes(data))
    r = run([sys.executable, "infer.py", "--selftest"], cwd=b)
    assert r.returncode != 0
    assert "selftest FAILED" in r.stderr and "Traceback" not in r.stderr
    (b / "selftest.npz").write_bytes(b"garbage")
    r = run([sys.executable, "infer.py", "--selftest"], cwd=b)
    assert r.returncode == 1 and "cannot read selftest.npz" in r.stderr
    # verify sees the change too
    r = run([sys.executable, "-m", "edgebuild", "verify", b])
    assert r.returncode == 2 and "altered" in r.stderr


@pytest.mark.parametrize("target", ["x86-onnxruntime-int8", "x86-openvino-fp32"])
def test_validate_runs_selftest_and_benchmark(dist, target):
    r = run([sys.executable, "-m", "edgebuild", "validate", "--json", dist / f"{NAME}-{target}.tar.gz"])
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["selftest"] == "passed"
    assert out["benchmark"]["p50_ms"] > 0
    r = run([sys.executable, "-m", "edgebuild", "verify", dist / f"{NAME}-{target}"])
    assert r.returncode == 0, r.stderr


def test_manifest_is_complete(dist):
    """Keys and values: every checksum and size against the files, preprocess, labels and the
    input shape against the build file and the data, the shape also against the model file."""
    import yaml

    cfg = yaml.safe_load((EXAMPLE / "edgebuild.yaml").read_text(encoding="utf-8"))
    classes = sorted(d.name for d in (EXAMPLE / cfg["data"]["train"]).iterdir() if d.is_dir())
    channels = {"grayscale": 1, "rgb": 3}[cfg["preprocess"]["color"]]
    for target in HOST_TARGETS:
        b = bundle(dist, target)
        m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
        assert m["schema"] == "edgebuild.bundle/1" and m["name"] == NAME and m["version"] == cfg["version"]
        assert m["target"]["name"] == target
        model = m["model"]
        assert {"file", "format", "precision", "inputs", "outputs"} <= set(model)
        for io_ in model["inputs"] + model["outputs"]:
            assert {"name", "shape", "dtype", "layout"} <= set(io_)
        # labels: the data's classes (sorted folder names), in labels.txt too
        assert m["labels"] == classes and (b / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
        # preprocess: exactly the build file's, plus the fixed layout and dtype
        assert m["preprocess"] == {**cfg["preprocess"], "layout": "NCHW", "dtype": "float32"}, target
        # shapes: the build file's input size and colour, the profile's batch, one logit per class
        batch = m["target"]["batch"] if isinstance(m["target"]["batch"], int) else "N"
        assert model["inputs"][0]["shape"] == [batch, channels, *cfg["preprocess"]["input_size"]], target
        assert model["outputs"][0]["shape"] == [batch, len(classes)], target
        assert _model_input_shape(b / model["file"])[1:] == [channels, *cfg["preprocess"]["input_size"]], target
        for k in ("accuracy", "reference_accuracy", "agreement", "max_abs_diff", "latency_p50_ms", "latency_p90_ms",
                  "size_bytes", "macs", "params", "validation"):
            assert m["metrics"].get(k) is not None, (target, k)
        # size: the model files' bytes on disk
        assert m["metrics"]["size_bytes"] == sum((b / f).stat().st_size for f in model["files"]) > 0, target
        prov = m["provenance"]
        for k in ("config_sha256", "data_sha256", "backbone_weights_sha256", "seed", "packages", "git_commit"):
            assert k in prov, (target, k)
        assert prov["config_sha256"] == _sha256(EXAMPLE / "edgebuild.yaml") and prov["seed"] == cfg["seed"]
        assert prov["backbone_weights_sha256"] == _sha256(EXAMPLE / cfg["backbone"]["weights"])
        # files: every file of the bundle but the manifest, each with its real sha256
        assert m["files"] == {p.relative_to(b).as_posix(): _sha256(p) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json"}
        has_cpp = (b / "cpp" / "main.cpp").is_file()
        assert has_cpp == ("openvino" in target)
        readme = (b / "README.md").read_text(encoding="utf-8")
        assert "pip install -r requirements.txt" in readme and "--selftest" in readme and "Validated figures" in readme


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_input_shape(path: Path) -> list:
    """The model file's own input shape, read by its runtime (a dynamic dimension as a string)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        return list(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape)
    import openvino as ov

    shape = ov.Core().read_model(str(path)).inputs[0].get_partial_shape()
    return [d.get_length() if d.is_static else str(d) for d in shape]
