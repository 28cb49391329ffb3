"""dist/report.html: self-contained, readable, and it renders in a real browser."""

import json
import re
import shutil
import subprocess

import pytest

from edgebuild.report import chart_svg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_json_and_html_written(tiny_project, cli):
    code, _, err = cli("build", tiny_project / "edgebuild.yaml", "-t", "x86-onnxruntime-fp32", "-t", "x86-openvino-int8", "-t", "rpi-aarch64-onnxruntime-int8")
    assert code == 0, err
    dist = tiny_project / "dist"
    report = json.loads((dist / "report.json").read_text())
    html = (dist / "report.html").read_text()
    assert set(report["targets"]) == {"x86-onnxruntime-fp32", "x86-openvino-int8", "rpi-aarch64-onnxruntime-int8"}
    for name in report["targets"]:
        assert name in html
    assert "<svg" in html and "accuracy versus latency" in html
    assert "fp32 reference (PyTorch)" in html
    assert "not run" in html  # the aarch64 target
    # self-contained: nothing fetched from the network
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script" not in html


def test_chart_places_every_measured_artifact_and_reference():
    report = {
        "stages": [{"stage": "transfer", "target": "", "host_latency_p50_ms": 2.0, "val_accuracy": 0.97}],
        "targets": {
            "a<b>": {"profile": {"precision": "int8"}, "precision": {"effective": "int8"}, "metrics": {"status": "measured", "latency_p50_ms": 0.2, "accuracy": 0.96}},
            "c": {"profile": {"precision": "fp32"}, "metrics": {"status": "measured", "latency_p50_ms": 0.5, "accuracy": 0.97}},
            "d": {"profile": {"precision": "int8"}, "metrics": {"status": "not run", "reason": "x"}},
        },
    }
    svg = chart_svg(report)
    assert svg.count("<circle") == 2 * 2  # point + legend marker per artifact
    assert "a&lt;b&gt; (int8)" in svg and "<b>" not in svg
    assert "fp32 reference (PyTorch)" in svg


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(tiny_project, cli, tmp_path):
    code, _, err = cli("build", tiny_project / "edgebuild.yaml", "-t", "x86-onnxruntime-fp32", "-t", "x86-onnxruntime-int8")
    assert code == 0, err
    shot = tmp_path / "report.png"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
                        (tiny_project / "dist" / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 20  # text, tables and the chart, not a blank page
    # dump the DOM too: the chart's points and the targets table were rendered
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", (tiny_project / "dist" / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert "x86-onnxruntime-int8" in r.stdout and "<circle" in r.stdout
