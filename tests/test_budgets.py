"""The budgets rule: the build file's limit wins over a profile default, a profile's hard
device limit can only be tightened, and each limit says where it came from."""

import pytest

from edgebuild.budgets import annotate, resolve
from edgebuild.config import Budgets, TargetProfile
from edgebuild.errors import closest
from edgebuild.profiles import ProfileRegistry


def prof(**kw):
    return TargetProfile(name="p", runtime="onnxruntime", **kw)


def test_build_file_loosens_a_profile_default():
    r = resolve(prof(budgets=Budgets(min_agreement=0.95)), Budgets(min_agreement=0.85))
    assert r["min_agreement"]["value"] == 0.85
    assert r["min_agreement"]["source"] == "build file (profile default 0.95)"


def test_profile_default_applies_when_build_file_is_silent():
    r = resolve(prof(budgets=Budgets(min_agreement=0.95)), Budgets(max_size_mb=3))
    assert r["min_agreement"] == {"value": 0.95, "source": "profile p (default)"}
    assert r["max_size_mb"] == {"value": 3, "source": "build file"}


def test_hard_device_limit_is_tightened_never_loosened():
    p = prof(budgets=Budgets(max_size_mb=4.0, min_agreement=0.9), hard_budgets=["max_size_mb", "min_agreement"])
    loose = resolve(p, Budgets(max_size_mb=8.0, min_agreement=0.5))
    assert loose["max_size_mb"]["value"] == 4.0 and "hard device limit" in loose["max_size_mb"]["source"]
    assert loose["min_agreement"]["value"] == 0.9
    tight = resolve(p, Budgets(max_size_mb=2.0, min_agreement=0.99))
    assert tight["max_size_mb"]["value"] == 2.0 and tight["min_agreement"]["value"] == 0.99


def test_gate_rows_carry_their_source():
    limits = resolve(prof(budgets=Budgets(min_agreement=0.95)), Budgets(max_latency_ms=5))
    rows = annotate([{"budget": "max_latency_ms (p90)"}, {"budget": "min_agreement"}, {"budget": "parity max_abs_diff"}], limits)
    assert [r["source"] for r in rows] == ["build file", "profile p (default)", "edgebuild (precision tolerance)"]


def test_hard_budgets_names_are_checked():
    with pytest.raises(ValueError, match="not a budget"):
        prof(hard_budgets=["max_size"])


def test_suggestions_never_invert_meaning():
    allowed = ["max_latency_ms", "max_size_mb", "max_accuracy_drop", "min_agreement"]
    assert closest("min_accuracy", allowed) != "max_accuracy_drop"
    assert closest("max_acuracy_drop", allowed) == "max_accuracy_drop"


def test_targets_show_lists_the_default_limits(cli):
    code, out, _ = cli("targets", "show", "x86-onnxruntime-int8")
    assert code == 0
    assert "#   min_agreement: 0.95  (default: the build file's budgets override it)" in out


def test_every_builtin_profile_default_is_in_the_readme():
    from conftest import REPO

    rows = {line.split("|")[1].strip(" `"): line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `")}
    reg = ProfileRegistry()
    for n in reg.names():
        p = reg.get(n)
        limits = [f"{k} {getattr(p.budgets, k):g}" for k in Budgets.model_fields if getattr(p.budgets, k) is not None]
        cell = rows[n].split("|")[3].strip()
        assert cell == (", ".join(limits) or "none"), (n, cell)
