"""dist/report.html: self-contained, readable, and it renders in a real browser."""

import json
import re
import shutil
import subprocess

import pytest

from edgebuild.report import chart_svg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_json_and_html_written(tiny_project, cli):
    from conftest import write_config

    write_config(tiny_project, extra="budgets: {min_agreement: 0.5}\n")  # a tiny model's int8 may disagree often
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
    # the sections README promises: training curves, compression, per-class results per artifact
    assert "<h2>Training</h2>" in html and 'class="curve"' in html
    assert "<h2>Compression</h2>" in html and "int8 quantization, x86-openvino-int8" in html
    for name in ("x86-onnxruntime-fp32", "x86-openvino-int8"):
        assert f"<h3>{name} on val</h3>" in html
    assert "rpi-aarch64-onnxruntime-int8 on val" not in html  # not measured here: no per-class claims
    assert html.count('<table class="confusion">') == 2
    assert "% of max |logit|" in html and "rounds," in html and "limit from" in html
    conf = report["targets"]["x86-onnxruntime-fp32"]["metrics"]["confusion"]
    assert sum(map(sum, conf)) == report["targets"]["x86-onnxruntime-fp32"]["metrics"]["samples"]
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
    from conftest import write_config

    write_config(tiny_project, extra="budgets: {min_agreement: 0.5}\n")
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
    assert "Per-class results" in r.stdout and 'class="confusion"' in r.stdout and 'class="curve"' in r.stdout


def test_accuracy_axis_is_never_zoomed_below_ten_points():
    from edgebuild.report_sections import accuracy_axis

    lo, hi = accuracy_axis([0.95, 0.97])
    assert hi - lo >= 0.1 and lo <= 0.95 and hi >= 0.97 and hi <= 1.0
    lo, hi = accuracy_axis([0.99, 1.0])
    assert hi == 1.0 and hi - lo >= 0.1
    lo, hi = accuracy_axis([0.2, 0.9])
    assert lo < 0.2 and hi > 0.9
    report = {"targets": {"a": {"profile": {"precision": "fp32"}, "metrics": {"status": "measured", "latency_p50_ms": 1.0, "accuracy": 0.95}},
                          "b": {"profile": {"precision": "int8"}, "metrics": {"status": "measured", "latency_p50_ms": 0.5, "accuracy": 0.97}}}}
    svg = chart_svg(report)
    ticks = [float(t) for t in re.findall(r'text-anchor="end">([0-9.]+)</text>', svg)]
    assert max(ticks) - min(ticks) >= 0.0999  # the 2-point gap takes at most a fifth of the height


def test_per_class_rows_and_matrix():
    from edgebuild.report_sections import matrix_html, per_class

    conf = [[8, 2, 0], [1, 9, 0], [0, 0, 0]]
    rows = per_class(conf, ["cat", "dog", "emu"])
    assert rows[0] == {"class": "cat", "n": 10, "recall": 0.8, "precision": 8 / 9, "f1": pytest.approx(2 * 0.8 * (8 / 9) / (0.8 + 8 / 9)),
                       "confused_with": "dog", "confused_n": 2}
    assert rows[2]["recall"] is None and rows[2]["n"] == 0
    html = matrix_html(conf, ["cat", "dog", "<emu>"])
    assert "&lt;emu&gt;" in html and html.count("<tr>") == 4


def test_slower_artifact_of_the_same_runtime_is_named():
    from edgebuild.report_sections import slower_notes

    def t(rt, p50, acc):
        return {"profile": {"runtime": rt}, "metrics": {"status": "measured", "latency_p50_ms": p50, "accuracy": acc, "settings": {"runtime": rt}}}

    report = {"targets": {"ov-fp16": t("openvino", 22.9, 0.97), "ov-fp32": t("openvino", 13.2, 0.97), "ort-fp32": t("onnxruntime", 5.0, 0.99),
                          "ov-int8": t("openvino", 4.0, 0.90)}}
    notes = slower_notes(report)
    assert set(notes) == {"ov-fp16"}  # int8 is faster but less accurate; ORT is another runtime
    assert "slower than ov-fp32" in notes["ov-fp16"] and "22.900 ms vs 13.200 ms" in notes["ov-fp16"]


@pytest.mark.slow
def test_compression_section_shows_prune_accuracies(tiny_project, cli):
    from conftest import write_config

    write_config(tiny_project, targets="[x86-onnxruntime-int8]", extra="compress:\n  prune: {ratio: 0.5, recover_epochs: 1}\n  distill: {}\nbudgets: {max_accuracy_drop: 0.5}\n")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    html = (tiny_project / "dist" / "report.html").read_text()
    report = json.loads((tiny_project / "dist" / "report.json").read_text())
    p = next(iter(report["compression"].values()))["prune"]
    for v in (p["accuracy_before"], p["accuracy_after_prune"], p["accuracy_recovered"]):
        assert f"{v:.4f}" in html
    assert "with distillation from the unpruned model" in html
    assert "prune recovery (align 8)" in html  # its curve beside the transfer's


def test_per_class_sections_for_val_and_test_and_slower_note_in_targets_show(tmp_path, cli):
    from edgebuild.report import render_html

    m = {"status": "measured", "latency_p50_ms": 2.0, "latency_p90_ms": 2.5, "accuracy": 0.9, "agreement": 1.0, "max_abs_diff": 0.01,
         "reference_scale": 5.0, "size_bytes": 1000, "confusion": [[9, 1], [1, 9]], "test_confusion": [[4, 1], [0, 5]],
         "benchmark": {"rounds": 5, "iterations": 100, "p90_spread_pct": 4.0}, "settings": {"runtime": "openvino"}}
    fast = dict(m, latency_p50_ms=1.0, test_confusion=None)
    report = {"name": "n", "version": "1", "status": "ok", "edgebuild": "0", "seconds": 1.0, "classes": ["cat", "dog"], "plan": [],
              "stage_seconds": {}, "targets": {"slow": {"profile": {"precision": "fp16", "runtime": "openvino"}, "metrics": m, "gates": [], "bundle": "b", "status": "pass",
                                                        "slower": "slower than fast on this host (p50 2.000 ms vs 1.000 ms) with no accuracy gained (0.9000 vs 0.9000)"},
                                               "fast": {"profile": {"precision": "fp32", "runtime": "openvino"}, "metrics": fast, "gates": [], "bundle": "c", "status": "pass"}}}
    html = render_html(report)
    assert "<h3>slow on val</h3>" in html and "<h3>slow on test</h3>" in html and "<h3>fast on test</h3>" not in html
    assert "slow: slower than fast" in html and "0.2% of max |logit| 5" in html and "±2.0% over 5 rounds" in html
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "report.json").write_text(json.dumps({"targets": {"x86-openvino-fp16": {"slower": "slower than x86-openvino-fp32 (test)"}}}))
    (tmp_path / "edgebuild.yaml").write_text("name: x\n")
    code, out, _ = cli("targets", "show", "x86-openvino-fp16", "-c", tmp_path / "edgebuild.yaml")
    assert code == 0 and "# last build (" in out and "slower than x86-openvino-fp32 (test)" in out
