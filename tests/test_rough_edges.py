"""Small things a new user trips over: Markdown escapes, --json errors, the cache listing and
pruning, infer.py on a folder, transformers' loading bars."""

import json
import os
import subprocess
import sys
import time



from edgebuild.render import md, mdcode


def test_markdown_escapes_only_what_changes_meaning():
    assert md("shapes-tiny 0.1.0") == "shapes-tiny 0.1.0"
    assert md("x86_64 [1, 3, 32, 32]") == "x86_64 [1, 3, 32, 32]"
    assert md("[click](javascript:alert(1))") == "\\[click\\](javascript:alert(1))"
    assert md("<img src=x>") == "\\<img src=x\\>" and md("a*b|c") == "a\\*b\\|c"
    assert md("# not a heading") == "\\# not a heading" and md("1. not a list") == "1\\. not a list"
    assert md("_em_") == "\\_em\\_"
    assert mdcode("center-crop") == "`center-crop`" and mdcode("a`b") == "``a`b``"


def test_json_flag_prints_a_bad_input_error_as_json(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("build", "--json")
    assert code == 2 and "error:" in err
    doc = json.loads(out)
    assert doc["status"] == "error" and "no build file" in doc["error"] and doc["exit_code"] == 2 and "init" in doc["hint"]
    code, out, err = cli("build", "--json", "--no-such-flag")
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_cache_ls_names_build_and_target_and_prune_removes_old(tiny_project, cli):
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    code, out, _ = cli("cache", "ls")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(("export", "validate", "transfer"))]
    assert any(line.split()[1] == "tiny" and line.split()[2] == "x86-onnxruntime-fp32" for line in lines if line.startswith("export"))
    assert any(line.split()[2] == "(shared)" for line in lines if line.startswith("transfer"))
    root = os.environ["EDGEBUILD_CACHE_DIR"]
    from edgebuild.cache import Cache

    entries = Cache().entries()
    old = next(e for e in entries if e["stage"] == "export")
    past = time.time() - 40 * 86400
    os.utime(os.path.join(root, "export", old["key"], "entry.json"), (past, past))
    code, out, _ = cli("cache", "prune", "--older-than", "30d")
    assert code == 0 and "removed 1 entries" in out
    assert not os.path.exists(os.path.join(root, "export", old["key"]))
    assert len(Cache().entries()) == len(entries) - 1
    code, _, err = cli("cache", "prune", "--older-than", "soon")
    assert code == 2 and "30d" in err


def test_infer_accepts_a_folder(tiny_project, cli):
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 0, err
    bundle = tiny_project / "dist" / "tiny-x86-onnxruntime-fp32"
    folder = tiny_project / "data" / "val"
    r = subprocess.run([sys.executable, str(bundle / "infer.py"), str(folder), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert len(results) == sum(1 for _ in folder.rglob("*.png")) == 15
    r = subprocess.run([sys.executable, str(bundle / "infer.py"), str(tiny_project / "targets-none")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such image file or folder" in r.stderr
    readme = (bundle / "README.md").read_text()
    assert "tiny 0.0.1" in readme and "\\-" not in readme and "\\." not in readme  # reads cleanly in a terminal


def test_hf_loading_bars_are_off(tmp_path):
    import transformers

    from edgebuild.backbones import factory

    transformers.utils.logging.enable_progress_bar()
    try:
        factory("hf:nothing-here", tmp_path)
    except Exception:  # the provider is built before anything is loaded; the setting is what matters
        pass
    assert not transformers.utils.logging.is_progress_bar_enabled()
