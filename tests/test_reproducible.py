"""Same build file, data, weights and seed: same bytes, from a cold cache too."""

import hashlib
import json
import sys

import pytest

from conftest import make_tiny_project, write_config

pytestmark = pytest.mark.slow

TARGETS = "[x86-onnxruntime-fp32, x86-onnxruntime-int8, x86-openvino-int8]"


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cold_builds_from_two_folders_are_byte_identical(tmp_path, cli, monkeypatch):
    """The same project in two different folders, each with a cold cache: every target's
    archive has the same bytes, and no shipped file names the folder or the user module."""
    outs, roots = [], []
    for i, where in enumerate(("a", "somewhere/else/b")):
        root = make_tiny_project(tmp_path / where)
        write_config(root, targets=TARGETS)
        monkeypatch.setenv("EDGEBUILD_CACHE_DIR", str(tmp_path / f"cold-cache-{i}"))
        code, _, err = cli("build", root / "edgebuild.yaml", "--reproducible")
        assert code == 0, err
        outs.append(root / "dist")
        roots.append(root)
    for t in ("x86-onnxruntime-fp32", "x86-onnxruntime-int8", "x86-openvino-int8"):
        name = f"tiny-{t}"
        a, b = digests(outs[0] / name), digests(outs[1] / name)
        assert a == b, {k for k in a if a[k] != b.get(k)}
        assert (outs[0] / f"{name}.tar.gz").read_bytes() == (outs[1] / f"{name}.tar.gz").read_bytes()
        assert (outs[0] / f"{name}.tar.gz.sha256").read_text() == (outs[1] / f"{name}.tar.gz.sha256").read_text()
        m = json.loads((outs[0] / name / "manifest.json").read_text())
        assert "latency_p50_ms" not in m["metrics"] and "reproducible" in m["metrics"]["timings"]
        assert m["metrics"]["accuracy"] is not None  # deterministic figures stay
        for f in sorted((outs[1] / name).rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                for leak in (str(roots[1]).encode(), str(tmp_path).encode(), b"edgebuild_user_", sys.prefix.encode(), b"stack_trace"):
                    assert leak not in data, (f.name, leak)


def test_model_files_identical_without_the_flag(tiny_project, cli, tmp_path, monkeypatch):
    """A default build records host timings in manifest.json, but every model, stub and
    golden-vector file is still the same from a cold cache."""
    outs = []
    for i in range(2):
        monkeypatch.setenv("EDGEBUILD_CACHE_DIR", str(tmp_path / f"c{i}"))
        code, _, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tmp_path / f"d{i}")
        assert code == 0, err
        outs.append(tmp_path / f"d{i}" / "tiny-x86-onnxruntime-fp32")
    a, b = digests(outs[0]), digests(outs[1])
    differing = {k for k in a if a[k] != b.get(k)}
    assert differing <= {"manifest.json", "README.md"}, differing
    m = json.loads((outs[0] / "manifest.json").read_text())
    assert m["metrics"]["latency_p50_ms"] > 0


def test_coreml_packages_are_byte_identical(tmp_path, cli, monkeypatch):
    """Core ML: two cold builds give the same .mlpackage and archive bytes. coremltools keys the
    package's items by random UUIDs in Manifest.json; the adapter derives them from the items'
    paths, and the package still reads back as the same ML Program."""
    import coremltools as ct

    outs = []
    for i in range(2):
        root = make_tiny_project(tmp_path / f"p{i}")
        write_config(root, targets="[ios-coreml-fp16]")
        monkeypatch.setenv("EDGEBUILD_CACHE_DIR", str(tmp_path / f"cold-cache-{i}"))
        code, _, err = cli("build", root / "edgebuild.yaml", "--reproducible")
        assert code == 0, err
        outs.append(root / "dist")
    name = "tiny-ios-coreml-fp16"
    a, b = digests(outs[0] / name), digests(outs[1] / name)
    assert "model.mlpackage/Manifest.json" in a and a == b, {k for k in a if a[k] != b.get(k)}
    assert (outs[0] / f"{name}.tar.gz").read_bytes() == (outs[1] / f"{name}.tar.gz").read_bytes()
    manifest = json.loads((outs[0] / name / "model.mlpackage" / "Manifest.json").read_text())
    assert manifest["rootModelIdentifier"] in manifest["itemInfoEntries"] and len(manifest["itemInfoEntries"]) == 2
    spec = ct.utils.load_spec(str(outs[0] / name / "model.mlpackage"))
    assert spec.WhichOneof("Type") == "mlProgram" and [o.name for o in spec.description.output] == ["logits"]
