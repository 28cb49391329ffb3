"""Claims of README.md and docs/HARDENING.md that had no test: the validate gates driven to
FAIL, `cache ls|clear`, `--force`, SOURCE_DATE_EPOCH, OpenVINO's run
precision, the manifest's values, the output-folder errors. Expected values come from hand
arithmetic or from running the files with the runtimes directly."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from edgebuild.cache import Cache
from edgebuild.errors import EdgebuildError
from edgebuild.profiles import ProfileRegistry
from edgebuild.publish import write_atomic
from edgebuild.stages import export as export_stage
from edgebuild.stages import validate as validate_stage

from conftest import write_config


def sha256(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def ort_logits(path: Path, X: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: X})[0]


# ------------------------------------------------------------------ validate gates driven to FAIL
@pytest.fixture
def fp32_artifact(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    prof = ProfileRegistry([]).get("x86-onnxruntime-fp32").model_copy(update={"threads": 1})
    export_stage.run(m, torch.zeros(1, 1, 8, 8), prof, tmp_path)
    X = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    return prof, tmp_path, X, ort_logits(tmp_path / "model.onnx", X)


def test_gates_fail_on_accuracy_drop_agreement_and_parity(fp32_artifact):
    """40 images. Labels: the model's own top-1 except 6 rows -> accuracy 34/40 = 0.85, a drop
    of 0.15 from 1.0. Reference: the real logits with 4 rows pushed to another class by +10 ->
    agreement 36/40 = 0.9, max abs diff about 10 (parity limit 1e-3 * max(1, |ref|))."""
    prof, art, X, logits = fp32_artifact
    top = logits.argmax(1)
    y = top.copy()
    y[:6] = (top[:6] + 1) % 3
    ref = logits.copy()
    ref[36:, :] += 10 * np.eye(3, dtype=np.float32)[(top[36:] + 1) % 3]
    ref[30:34] += 1e-5  # tiny, within parity
    metrics = validate_stage.run(prof, art, "fp32", X, y, ref)
    assert metrics["accuracy"] == pytest.approx(34 / 40) and metrics["agreement"] == pytest.approx(36 / 40)
    assert metrics["max_abs_diff"] == pytest.approx(10, abs=0.01)
    rows = validate_stage.gates("t", "fp32", metrics, {"max_accuracy_drop": 0.1, "min_agreement": 0.95}, fp32_accuracy=1.0)
    verdicts = {r["budget"]: (r["verdict"], r["measured"]) for r in rows}
    assert verdicts["max_accuracy_drop"] == ("FAIL", 0.15)
    assert verdicts["min_agreement"] == ("FAIL", 0.9)
    assert verdicts["parity max_abs_diff"][0] == "FAIL"
    # limits met exactly pass: a drop equal to the budget, an agreement equal to the minimum
    rows = validate_stage.gates("t", "fp32", metrics, {"max_accuracy_drop": 0.15, "min_agreement": 0.9}, fp32_accuracy=1.0)
    assert {r["budget"]: r["verdict"] for r in rows} == {"max_accuracy_drop": "pass", "min_agreement": "pass", "parity max_abs_diff": "FAIL"}


def test_gates_pass_on_the_true_reference(fp32_artifact):
    prof, art, X, logits = fp32_artifact
    y = logits.argmax(1)
    metrics = validate_stage.run(prof, art, "fp32", X, y, logits)
    assert metrics["accuracy"] == 1.0 and metrics["agreement"] == 1.0 and metrics["max_abs_diff"] < 1e-5
    rows = validate_stage.gates("t", "fp32", metrics, {"max_accuracy_drop": 0.0, "min_agreement": 1.0}, fp32_accuracy=1.0)
    assert [r["verdict"] for r in rows] == ["pass", "pass", "pass"]


def test_gate_failure_through_the_cli_is_exit_3(tiny_project, cli):
    """A real build whose size budget cannot be met and whose agreement budget (1.0, fp32 against
    its own reference) is met: exit 3, the table lists only the failed gate, the report both."""
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "strict.yaml").write_text("extends: x86-onnxruntime-fp32\nbudgets: {max_size_mb: 0.000001, min_agreement: 1.0}\n")
    p = write_config(tiny_project, targets="[strict]")
    code, _, err = cli("build", p, "-o", tiny_project / "dist")
    assert code == 3
    table = err.split("error:")[0]
    assert "max_size_mb" in table and "min_agreement" not in table  # only the failed gate is listed
    report = json.loads((tiny_project / "dist" / "failed-report.json").read_text())  # a failed build's report
    gates = {g["budget"]: g["verdict"] for g in report["targets"]["strict"]["gates"]}
    assert gates == {"max_size_mb": "FAIL", "min_agreement": "pass", "parity max_abs_diff": "pass"}


# ------------------------------------------------------------------ cache ls | clear
def test_cache_ls_and_clear(tmp_path, cli):
    root = tmp_path / "c"
    c = Cache(root)
    c.put("transfer", "k1", {}, lambda d: (d / "w.bin").write_bytes(b"x" * 2_000_000))
    c.put("export", "k2", {}, lambda d: (d / "m.onnx").write_bytes(b"y" * 500_000))
    code, out, _ = cli("cache", "ls", "--cache-dir", root)
    assert code == 0
    lines = out.strip().splitlines()
    # stage, build, target ("-": not recorded), key, MB
    assert lines[0].split()[:5] == ["export", "-", "-", "k2", "0.50"] and lines[1].split()[:5] == ["transfer", "-", "-", "k1", "2.00"]
    assert lines[-1].startswith("2 entries, 2.50 MB in")  # 2.5 MB of payload plus two small entry.json files
    code, out, _ = cli("cache", "clear", "--cache-dir", root)
    assert code == 0 and out.startswith("removed 2 entries")
    assert not [p for p in root.rglob("*") if p.is_file() and p.name not in ("CACHEDIR.TAG", "edgebuild-cache.json")]  # the cache's own markers stay
    code, out, _ = cli("cache", "ls", "--cache-dir", root)
    assert out.strip().startswith("0 entries")


# ------------------------------------------------------------------ --force, SOURCE_DATE_EPOCH
def test_force_reruns_every_stage(tiny_project, cli):
    code, out, _ = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert all(s["cached"] for s in json.loads(out)["plan"])
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "--force")
    assert code == 0
    plan = json.loads((tiny_project / "dist" / "report.json").read_text())["plan"]
    assert [(s["cached"], s["reason"]) for s in plan] == [(False, "--force")] * 3
    for stage in ("transfer", "export [x86-onnxruntime-fp32]", "validate [x86-onnxruntime-fp32]"):
        assert f"running {stage}" in err


def test_source_date_epoch_makes_bundles_reproducible(tiny_project, cli, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "d1")
    assert code == 0, err
    m = json.loads((tiny_project / "d1" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_text())
    assert "latency_p50_ms" not in m["metrics"] and m["metrics"]["timings"].startswith("omitted: reproducible build")
    report = json.loads((tiny_project / "d1" / "report.json").read_text())
    assert report["targets"]["x86-onnxruntime-fp32"]["metrics"]["latency_p50_ms"] > 0  # kept in report.json
    code, _, _ = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "d2", "--force")
    assert code == 0
    a, b = (tiny_project / d / "tiny-x86-onnxruntime-fp32.tar.gz" for d in ("d1", "d2"))
    assert a.read_bytes() == b.read_bytes()
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    code, _, _ = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "d3")
    m = json.loads((tiny_project / "d3" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_text())
    assert m["metrics"]["latency_p50_ms"] > 0


# ------------------------------------------------------------------ manifest values
def test_manifest_values_are_right(tiny_project, cli):
    """Every value checked against the files themselves, hand arithmetic or ONNX Runtime."""
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    b = tiny_project / "dist" / "tiny-x86-onnxruntime-fp32"
    m = json.loads((b / "manifest.json").read_text())
    prov = m["provenance"]
    assert prov["config_sha256"] == sha256(tiny_project / "edgebuild.yaml")
    assert prov["backbone_weights_sha256"] == sha256(tiny_project / "backbone.safetensors")
    assert prov["seed"] == 0 and prov["backbone_source"] == "python:backbone.py:build"
    assert m["labels"] == ["a", "b", "c"] and (b / "labels.txt").read_text() == "a\nb\nc\n"
    assert m["preprocess"] == {"input_size": [16, 16], "color": "grayscale", "resize": "stretch", "mean": [0.5], "std": [0.5],
                               "layout": "NCHW", "dtype": "float32"}
    assert m["model"]["inputs"][0]["shape"] == ["N", 1, 16, 16] and m["model"]["outputs"][0]["shape"] == ["N", 3]
    assert m["model"]["precision"] == m["model"]["requested_precision"] == "fp32"
    # conv 1*8*9+8, bn 2*8, conv 8*16*9+16, bn 2*16, fc 16*3+3 = 1347 params;
    # MACs: 16*16*8*9 + 8*8*16*72 + 3*16 = 92208
    assert m["metrics"]["params"] == 1347 and m["metrics"]["macs"] == 92208
    assert m["metrics"]["size_bytes"] == (b / "model.onnx").stat().st_size
    assert m["files"] == {p.relative_to(b).as_posix(): sha256(p) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json"}
    # accuracy: the val images by hand ((p/255 - 0.5) / 0.5, 16x16 already), run by ONNX Runtime
    X, y = [], []
    for ci, c in enumerate(m["labels"]):
        for f in sorted((tiny_project / "data" / "val" / c).iterdir()):
            X.append((np.asarray(Image.open(f), np.float32)[None] / 255.0 - 0.5) / 0.5)
            y.append(ci)
    pred = ort_logits(b / "model.onnx", np.stack(X).astype(np.float32)).argmax(1)
    assert m["metrics"]["accuracy"] == pytest.approx(float((pred == np.array(y)).mean()))
    assert m["metrics"]["agreement"] == 1.0 and m["metrics"]["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------ OpenVINO run precision
def _ov_model(tmp_path, target):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    prof = ProfileRegistry([]).get(target)
    d = tmp_path / target
    d.mkdir()
    export_stage.run(m, torch.zeros(1, 1, 8, 8), prof, d)
    return prof, d


def test_openvino_fp16_and_int8_run_precision(tmp_path):
    """README: an fp16 CPU artifact keeps fp16 weights but computes in f32 (f16 compute was slower
    on this kind of CPU even where OpenVINO reports FP16); int8 and fp32 run f32; always set
    explicitly (this host's default may be bf16)."""
    import openvino as ov

    from edgebuild.runtimes import open_runner
    from edgebuild.runtimes.openvino import inference_precision, quantize_openvino

    prof16, d16 = _ov_model(tmp_path, "x86-openvino-fp16")
    r = open_runner(prof16, d16, "fp16")
    assert r.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32" == r.settings["inference_precision"]
    assert inference_precision(None, "GPU", "fp16") == inference_precision(None, "NPU", "fp16") == "f16"
    assert any(op.get_element_type().get_type_name() == "f16" for op in ov.Core().read_model(str(d16 / "model.xml")).get_ordered_ops()
               if op.get_type_name() == "Constant")  # the weights really are stored in fp16
    prof8, d8 = _ov_model(tmp_path, "x86-openvino-int8")
    q = tmp_path / "q"
    q.mkdir()
    calib = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    quantize_openvino(d8 / "model.xml", q / "model.xml", calib, prof8)
    assert any(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(q / "model.xml")).get_ordered_ops())
    r = open_runner(prof8, q, "int8")
    assert r.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32" == r.settings["inference_precision"]


# ------------------------------------------------------------------ output-folder errors (HARDENING)
def test_output_folder_name_too_long_is_exit_2_before_training(tiny_project, cli):
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / ("d" * 300) / "dist")
    assert code == 2 and "File name too long" in err and "hint: " in err and "Traceback" not in err
    assert "running transfer" not in err


def test_output_folder_that_is_a_file_is_exit_2_before_training(tiny_project, cli):
    (tiny_project / "taken").write_text("x")
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "taken")
    assert code == 2 and f"Directory '{tiny_project / 'taken'}' is a file" in err and "hint: " in err
    assert "running transfer" not in err


def test_report_path_taken_by_a_folder_is_exit_2(tiny_project, cli):
    """EISDIR at the very end (report.json is a folder): exit 2 naming the path, no traceback."""
    (tiny_project / "dist" / "report.json").mkdir(parents=True)
    (tiny_project / "dist" / "report.json" / "keep").write_text("x")
    code, out, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 2 and f"{tiny_project / 'dist' / 'report.json'}: Is a directory" in err and ".tmp" not in err
    assert "hint: " in err and "Traceback" not in err


def test_write_atomic_over_a_folder_names_the_destination(tmp_path):
    """EISDIR from the final rename: the error names the destination, not the temporary file,
    and leaves no temporary file behind."""
    dst = tmp_path / "report.json"
    (dst / "keep").mkdir(parents=True)
    with pytest.raises(EdgebuildError) as e:
        write_atomic(dst, "{}")
    assert e.value.exit_code == 2 and e.value.message.startswith(f"cannot write {dst}: Is a directory") and ".tmp" not in e.value.message
    assert str(dst) in e.value.hint
    assert os.listdir(tmp_path) == ["report.json"] and os.listdir(dst) == ["keep"]
    with pytest.raises(FileNotFoundError) as e:  # any other error names the destination too
        write_atomic(tmp_path / "gone" / "search.json", "{}")
    assert e.value.filename == str(tmp_path / "gone" / "search.json")


def test_failed_report_path_taken_by_a_folder_is_exit_2(tiny_project, cli):
    """A gate fails, and the failed build's report cannot be written: exit 2 naming that path."""
    (tiny_project / "dist" / "failed-report.json").mkdir(parents=True)
    cfg = write_config(tiny_project, extra="budgets: {max_size_mb: 0.000001}\n")
    code, out, err = cli("build", cfg)
    assert code == 2 and f"error: cannot write {tiny_project / 'dist' / 'failed-report.json'}: Is a directory" in err
    assert ".tmp" not in err and "hint: move the folder" in err and "Traceback" not in err


# ------------------------------------------------------------------ CI: a missing tool fails under CI=true
def _run_require_tools(tmp_path: Path, ci: str | None, tools: tuple[str, ...]):
    """.ci/require-tools with a PATH holding only bash and the given tools (no apt-get, so
    nothing is installed)."""
    import shutil
    import subprocess

    from conftest import REPO

    bin_dir = tmp_path / f"bin-{ci}-{len(tools)}"
    bin_dir.mkdir()
    for t in ("bash", *tools):
        (bin_dir / t).symlink_to(shutil.which(t) or "/bin/true")
    env = {"PATH": str(bin_dir)} | ({"CI": ci} if ci is not None else {})
    return subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "require-tools")], env=env, capture_output=True, text=True)


def test_ci_fails_when_a_required_tool_is_missing(tmp_path):
    r = _run_require_tools(tmp_path, "true", ("cmake", "g++"))
    assert r.returncode == 1 and "error: required tool(s) missing: chromium" in r.stderr and "hint: " in r.stderr
    r = _run_require_tools(tmp_path, None, ("cmake", "g++"))
    assert r.returncode == 0 and "warning: missing chromium" in r.stderr
    r = _run_require_tools(tmp_path, "true", ("chromium", "cmake", "g++"))
    assert r.returncode == 0 and r.stderr == ""
