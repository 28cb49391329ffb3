"""compress.search: per target, the fastest candidate that meets every budget; search.json,
the Pareto chart, the manifest record, resuming from the cache, exit 3 when nothing fits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild.stages import search as search_stage

from conftest import write_config

SPACE = "compress:\n  prune: {recover_epochs: 1}\n  search: {prune_ratios: [0.0, 0.5], precisions: [fp32, int8], finalists: 2, benchmark_seconds: 0.2}\n"


def _build(root, extra, out="dist", targets="[x86-onnxruntime-int8]"):
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    p = write_config(root, targets=targets, epochs=3, extra=extra)
    return Build(load_build_config(p), out=root / out).run()


def test_search_chooses_the_fastest_candidate_within_budget(tiny_project):
    res = _build(tiny_project, SPACE + "budgets: {max_accuracy_drop: 0.2, min_agreement: 0.0}\n")
    s = json.loads((tiny_project / "dist" / "search.json").read_text())
    (g,) = s["groups"]
    rows = g["candidates"]
    assert {r["label"] for r in rows} == {"unpruned fp32", "unpruned int8", "prune 50% l2/uniform fp32", "prune 50% l2/uniform int8"}
    for r in rows:
        assert {"prune", "precision", "p50_ms", "p90_ms", "size_bytes", "macs", "params", "proxy_accuracy", "final_accuracy", "pareto", "chosen"} <= set(r)
        assert r["latency_source"] == "measured" and r["p90_ms"] >= r["p50_ms"] > 0
    assert [i for i, r in enumerate(rows) if r["pareto"]] == sorted(search_stage.pareto(rows))
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and g["chosen"] == rows.index(chosen[0])
    c = chosen[0]
    base = s["base_accuracy"]
    assert base - c["final_accuracy"] <= 0.2
    # no finalist that also meets the budget is faster
    assert all(r["p50_ms"] >= c["p50_ms"] for r in rows if r["final_accuracy"] is not None and base - r["final_accuracy"] <= 0.2)
    assert c["label"] in g["why"]
    # the drop paired image by image, with its 95% interval; a warning where val cannot resolve the budget
    assert c["final_drop"] == pytest.approx(base - c["final_accuracy"], abs=1e-6) and "± " in g["why"]
    assert (c["drop_ci95"] > 0.2) == any("resolve an accuracy drop" in w for w in res.report["warnings"])
    # the bundle is that candidate
    m = json.loads((tiny_project / "dist" / "tiny-x86-onnxruntime-int8" / "manifest.json").read_text())
    assert m["search"]["chosen"]["label"] == c["label"] and m["model"]["precision"] == c["precision"]
    assert (m["metrics"]["macs"] < rows[0]["macs"]) == (c["prune"]["ratio"] > 0)
    html = (tiny_project / "dist" / "report.html").read_text()
    assert "<h2>Search</h2>" in html and 'class="chosen"' in html and "Why this one" in html and f"&plusmn; {c['drop_ci95']:.4f}" in html
    assert html.count('class="dominated"') == sum(not r["pareto"] for r in rows)
    assert res.report["search"]["groups"][0]["chosen"] == g["chosen"]


def test_interrupted_search_resumes_from_the_cache(tiny_project, monkeypatch):
    calls = []
    real = search_stage._proxy

    def flaky(*a, **k):
        calls.append(a[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(search_stage, "_proxy", flaky)
    extra = SPACE + "budgets: {max_accuracy_drop: 0.2, min_agreement: 0.0}\n"
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_project, extra)
    s = json.loads((tiny_project / "dist" / "search.json").read_text())
    assert s["status"].startswith("interrupted")
    calls.clear()
    _build(tiny_project, extra)
    assert len(calls) == 2  # the two measured before Ctrl-C came from the cache
    s2 = json.loads((tiny_project / "dist" / "search.json").read_text())
    assert s2["status"] == "ok" and len(s2["groups"][0]["candidates"]) == 4


def test_no_candidate_meets_the_budgets_exits_3(tiny_project, cli):
    p = write_config(tiny_project, targets="[x86-onnxruntime-int8]", epochs=1,
                     extra=SPACE + "budgets: {max_latency_ms: 0.000001, min_agreement: 0.0}\n")
    code, out, err = cli("build", p, "-o", tiny_project / "dist")
    assert code == 3
    assert "no candidate" in (out + err) and "unpruned" in (out + err)
    s = json.loads((tiny_project / "dist" / "search.json").read_text())
    assert s["groups"][0]["chosen"] is None and len(s["groups"][0]["candidates"]) == 4


def test_target_that_cannot_run_here_gets_a_labelled_estimate(tiny_project):
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "arm-int8.yaml").write_text("extends: x86-onnxruntime-int8\narch: aarch64\n")
    space = "compress:\n  search: {prune_ratios: [0.0], precisions: [int8], benchmark_seconds: 0.2}\n"
    _build(tiny_project, space + "budgets: {min_agreement: 0.0}\n", targets="[arm-int8]")
    (r,) = json.loads((tiny_project / "dist" / "search.json").read_text())["groups"][0]["candidates"]
    assert r["latency_source"].startswith("estimate: onnxruntime on this host's CPU")


def test_paired_drop_interval():
    base = np.array([1, 1, 1, 1, 0, 0, 1, 1] * 25, float)
    same = search_stage.paired_drop(base, base)
    assert same == (0.0, 0.0)  # the same images right: no drop and no noise, whatever the val size
    worse = base.copy()
    worse[np.flatnonzero(base)[:20]] = 0  # 20 of 200 images lost, no other change
    drop, ci = search_stage.paired_drop(base, worse)
    d = np.r_[np.ones(20), np.zeros(180)]
    assert drop == pytest.approx(0.1) and ci == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(200), abs=1e-6)
    # four times the images halve the interval
    assert search_stage.paired_drop(np.tile(base, 4), np.tile(worse, 4))[1] == pytest.approx(ci / 2, rel=0.02)


def test_pareto_spearman_and_bn_recalibration():
    rows = [{"p50_ms": 1, "proxy_accuracy": 0.5}, {"p50_ms": 2, "proxy_accuracy": 0.9}, {"p50_ms": 3, "proxy_accuracy": 0.8}, {"p50_ms": 1, "proxy_accuracy": 0.4}]
    assert search_stage.pareto(rows) == [0, 1]
    assert search_stage.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert search_stage.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert search_stage.spearman([1, 2], [1, 2]) is None
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    X = (np.random.default_rng(0).standard_normal((64, 1, 8, 8)) * 3 + 2).astype(np.float32)
    search_stage.recalibrate_bn(m, X)
    with torch.no_grad():
        out = m(torch.as_tensor(X))
    assert out.mean().abs() < 0.1 and (out.std() - 1).abs() < 0.1 and not m.training
