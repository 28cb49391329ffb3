"""Distillation into a student of another architecture: trained from the transferred teacher,
then exported and bundled like any model; the report shows teacher and student side by side."""

from __future__ import annotations

import json
import tarfile
import textwrap

import onnx
import pytest

from conftest import write_config

STUDENT = textwrap.dedent(
    """
    from torch import nn

    def build():  # one strided convolution and a head: not the teacher's architecture
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    """
)


def _build(tiny_project, extra):
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    (tiny_project / "student.py").write_text(STUDENT)
    p = write_config(tiny_project, targets="[x86-onnxruntime-fp32]", extra=extra + "budgets: {min_agreement: 0.0}\n")
    return Build(load_build_config(p), out=tiny_project / "dist").run()


def test_student_of_another_architecture_is_distilled_and_bundled(tiny_project):
    res = _build(tiny_project, "compress: {distill: {student: 'python:student.py:build', epochs: 3, lr: 0.05}}\n")
    bdir = tiny_project / "dist" / "tiny-x86-onnxruntime-fp32"
    m = json.loads((bdir / "manifest.json").read_text())
    d = m["distillation"]
    assert d["student"]["source"] == "python:student.py:build" and d["teacher"]["source"] == "python:backbone.py:build"
    assert d["student"]["init"] == "random" and d["student"]["params"] < d["teacher"]["params"]
    # the shipped graph is the student's: one convolution (the teacher has two) and its 4-wide head
    graph = onnx.load(str(bdir / m["model"]["file"])).graph
    assert [n.op_type for n in graph.node].count("Conv") == 1
    assert m["metrics"]["params"] == d["student"]["params"]
    # trained from the teacher: better than chance on 4 balanced classes, and recorded per epoch
    assert d["student"]["val_accuracy"] > 0.25
    rows = {r["stage"]: r for r in res.report["stages"]}
    assert rows["distill"]["params"] == d["student"]["params"] and rows["transfer"]["params"] == d["teacher"]["params"]
    html = (tiny_project / "dist" / "report.html").read_text()
    assert "Teacher and student" in html and "python:student.py:build" in html
    assert res.report["plan"][1]["stage"] == "distill"


def test_student_starts_from_its_own_weights(tiny_project):
    import torch
    from safetensors.torch import save_file

    import importlib.util

    (tiny_project / "student.py").write_text(STUDENT)
    spec = importlib.util.spec_from_file_location("student_mod", tiny_project / "student.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(1)
    save_file(mod.build().state_dict(), str(tiny_project / "student.safetensors"))
    res = _build(tiny_project, "compress: {distill: {student: 'python:student.py:build', student_weights: student.safetensors, epochs: 0}}\n")
    d = res.report["distillation"]
    assert d["student"]["init"] == "weights student.safetensors"
    # zero epochs: the student body is exactly its own weights (only the new head is fresh)
    from edgebuild.config import load_build_config
    from edgebuild.stages import distill as distill_stage

    cfg = load_build_config(tiny_project / "edgebuild.yaml")
    step = next(s for s in res.report["plan"] if s["stage"] == "distill")
    from edgebuild.cache import Cache

    got = distill_stage.load_model(cfg, Cache().get("distill", step["key"]))
    torch.manual_seed(1)
    assert torch.equal(got[0].weight, mod.build()[0].weight)
