"""A fully cached rebuild: no heavy library imported, validate re-measured on request, archives
reused, the report marks cached stages with their original times."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_config

HEAVY = ("torch", "openvino", "nncf", "transformers", "onnx", "onnxruntime", "onnxscript", "torch_pruning")


def test_modules_import_without_heavy_libraries():
    code = ("import sys, edgebuild.cli, edgebuild.pipeline, edgebuild.report, edgebuild.verify, edgebuild.scaffold; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_noop_rebuild_imports_no_heavy_library(tiny_project, tmp_path):
    write_config(tiny_project, targets="[x86-onnxruntime-fp32, x86-openvino-int8]", extra="budgets: {min_agreement: 0.5}\n")
    env = {"EDGEBUILD_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cfg = str(tiny_project / "edgebuild.yaml")
    first = subprocess.run([sys.executable, "-m", "edgebuild", "build", cfg], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    # a library or edgebuild UserWarning prints as one "warning:" line, without file and line
    warned = [line for line in first.stderr.splitlines() if "calibration set has only" in line]
    assert warned and all(line.startswith("warning: ") and ".py:" not in line for line in warned), warned
    code = ("import sys; from edgebuild.cli import main; rc = main(['build', sys.argv[1]]); "
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules]); sys.exit(rc)")
    second = subprocess.run([sys.executable, "-c", code, cfg], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "HEAVY []" in second.stdout, second.stdout
    assert "run (" not in second.stderr  # every step cached
    report = json.loads((tiny_project / "dist" / "report.json").read_text())
    assert all(s["cached"] and s["original_seconds"] is not None and s["seconds"] is None for s in report["plan"])
    html = (tiny_project / "dist" / "report.html").read_text()
    assert "(cached)</span>" in html


def test_remeasure_reruns_only_validate(tiny_project, cli):
    write_config(tiny_project, targets="[x86-onnxruntime-fp32, x86-onnxruntime-int8]")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    archive = (tiny_project / "dist" / "tiny-x86-onnxruntime-int8.tar.gz").read_bytes()
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "--remeasure", "--json")
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert {s["stage"] for s in plan if not s["cached"]} == {"validate"}
    assert all(s["reason"] == "--remeasure" for s in plan if not s["cached"])
    bench = json.loads(out)["targets"]["x86-onnxruntime-int8"]["metrics"]["benchmark"]
    assert bench["rounds"] == 5 and len(bench["p90_rounds_ms"]) == 5 and bench["p90_spread_pct"] >= 0
    assert bench["iterations"] >= 50 and bench["warmup"] >= 10
    # a model file is unchanged by re-measuring: the archive's model bytes are the same
    assert (tiny_project / "dist" / "tiny-x86-onnxruntime-int8.tar.gz").is_file() and archive


def test_archive_reused_only_when_identical(tmp_path):
    from edgebuild.stages.bundle import make_archive

    d = tmp_path / "b"
    d.mkdir()
    (d / "a.txt").write_text("one")
    first = make_archive(d, tmp_path / "1.tar.gz", "b")
    again = make_archive(d, tmp_path / "2.tar.gz", "b", previous=tmp_path / "1.tar.gz")
    assert first == again and (tmp_path / "1.tar.gz").read_bytes() == (tmp_path / "2.tar.gz").read_bytes()
    (d / "a.txt").write_text("two")
    changed = make_archive(d, tmp_path / "3.tar.gz", "b", previous=tmp_path / "1.tar.gz")
    assert changed != first
    import tarfile

    with tarfile.open(tmp_path / "3.tar.gz") as t:
        assert t.extractfile("b/a.txt").read() == b"two"
