"""Pipeline behaviour on a tiny project: gates, overrides, atomic output, plan."""

import json

import pytest

from conftest import write_config


def test_build_writes_bundle_and_summary(tiny_project, cli):
    code, out, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    assert (tiny_project / "dist" / "tiny-x86-onnxruntime-fp32" / "model.onnx").is_file()
    assert "built 1 bundle(s)" in out
    assert "plan for tiny" in err


def test_impossible_latency_budget_exits_3_with_table_and_keeps_previous_dist(tiny_project, cli):
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0
    old = (tiny_project / "dist" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_bytes()
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "x86-onnxruntime-fp32.yaml").write_text(
        "extends: x86-openvino-fp32\nruntime: onnxruntime\nformat: onnx\nbudgets: {max_latency_ms: 0.000001, max_size_mb: 0.000001}\n")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 3
    assert "target" in err and "budget" in err and "limit" in err and "measured" in err
    assert "max_latency_ms (p90)" in err and "max_size_mb" in err
    assert "limit from" in err and "profile x86-onnxruntime-fp32 (default)" in err
    assert "hint: set budgets.max_latency_ms in the build file" in err
    assert "Traceback" not in err
    assert (tiny_project / "dist" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_bytes() == old
    assert not [p for p in (tiny_project / "dist").iterdir() if p.name.startswith(".staging")]
    report = json.loads((tiny_project / "dist" / "failed-report.json").read_text())
    assert report["status"] == "failed"
    assert json.loads((tiny_project / "dist" / "report.json").read_text())["status"] == "ok"  # the published build's, untouched
    assert "this build's report: " in err and "failed-report.html" in err


def test_user_profile_beside_build_file_overrides_builtin(tiny_project, cli):
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "x86-onnxruntime-fp32.yaml").write_text(
        "extends: x86-openvino-fp32\nruntime: onnxruntime\nformat: onnx\nthreads: 1\ndescription: my gateway\n")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    m = json.loads((tiny_project / "dist" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_text())
    assert m["target"]["threads"] == 1 and m["target"]["description"] == "my gateway"


def test_threads_change_reruns_only_validation(tiny_project, cli):
    code, _, _ = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "x86-onnxruntime-fp32.yaml").write_text("extends: x86-openvino-fp32\nruntime: onnxruntime\nformat: onnx\nbatch: dynamic\nthreads: 1\n")
    code, out, _ = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0
    plan = {(s["stage"], s["target"]): s for s in json.loads(out)["plan"]}
    assert plan[("transfer", "")]["cached"] and plan[("export", "x86-onnxruntime-fp32")]["cached"]
    v = plan[("validate", "x86-onnxruntime-fp32")]
    assert not v["cached"] and "threads" in v["reason"]


def test_corrupt_cache_entry_is_dropped_and_rebuilt(tiny_project, cli):
    """The damaged entry is dropped with a warning and rebuilt whole (the same bytes: training
    is deterministic); the other entries are reused; the next build is all cached, silently."""
    import hashlib
    import os
    import warnings
    from pathlib import Path

    def tree(d):
        return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
                if p.is_file() and p.name != "entry.json"}

    code, _, _ = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0
    root = Path(os.environ["EDGEBUILD_CACHE_DIR"])
    (entry,) = [p for p in (root / "transfer").iterdir() if not p.name.startswith(".")]
    good = tree(entry)
    bundle = tiny_project / "dist" / "tiny-x86-onnxruntime-fp32"
    first_bundle = tree(bundle)
    (entry / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=f"cache entry transfer/{entry.name} is (corrupt|damaged)") as seen:
        code, out, err = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0, err
    assert [str(w.message) for w in seen if "cache entry" in str(w.message)] == [str(seen[0].message)]  # only that entry
    plan = {(s["stage"], s["target"]): s["cached"] for s in json.loads(out)["plan"]}
    assert plan == {("transfer", ""): False, ("export", "x86-onnxruntime-fp32"): True, ("validate", "x86-onnxruntime-fp32"): True}
    rebuilt = tree(entry)
    assert set(rebuilt) == set(good) and "model.safetensors" in good
    assert {k: rebuilt[k] for k in good if k != "meta.json"} == {k: v for k, v in good.items() if k != "meta.json"}  # same bytes (meta.json holds timings)
    meta = json.loads((entry / "entry.json").read_text())
    assert meta["files"] == tree(entry)
    assert {k: v for k, v in tree(bundle).items() if k not in ("manifest.json", "README.md")} == \
        {k: v for k, v in first_bundle.items() if k not in ("manifest.json", "README.md")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="calibration set has only")
        code, out, _ = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0 and all(s["cached"] for s in json.loads(out)["plan"])


def test_data_error_exit_2(tiny_project, cli):
    (tiny_project / "data" / "val" / "a" / "img000.png").write_bytes(b"not a png")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 2 and "img000.png" in err and "Traceback" not in err


def test_plan_names_only_what_changed(tiny_project, cli):
    """Changing transfer.lr alone names transfer.lr, not preprocess (stored as JSON, whose
    input_size list once compared unequal to the config's tuple)."""
    code, _, err = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0, err
    text = (tiny_project / "edgebuild.yaml").read_text().replace("lr: 0.05", "lr: 0.04")
    (tiny_project / "edgebuild.yaml").write_text(text)
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0, err
    plan = {(s["stage"], s["target"]): s for s in json.loads(out)["plan"]}
    reason = plan[("transfer", "")]["reason"]
    assert reason == "changed: transfer.lr 0.05 -> 0.04", reason
    assert "preprocess" not in reason
    # downstream stages run because their input (the model) changed
    assert plan[("export", "x86-onnxruntime-fp32")]["reason"] == "changed: input model"


def test_build_file_budget_loosens_the_profile_default(tiny_project, cli):
    """A profile's min_agreement is a default: the build file's lower value is the one applied."""
    (tiny_project / "targets").mkdir()
    (tiny_project / "targets" / "strict.yaml").write_text("extends: x86-onnxruntime-fp32\nbudgets: {max_size_mb: 0.000001}\n")
    write_config(tiny_project, targets="[strict]")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 3 and "profile strict (default)" in err
    write_config(tiny_project, targets="[strict]", extra="budgets: {max_size_mb: 50}\n")
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "--json")
    assert code == 0, err
    gates = {g["budget"]: g for g in json.loads(out)["targets"]["strict"]["gates"]}
    assert gates["max_size_mb"]["limit"] == 50 and gates["max_size_mb"]["source"] == "build file (profile default 1e-06)"
    assert gates["min_agreement"]["source"] == "profile strict (default)"
