"""Hardening, round 2 (issue 13): the classes of bad input, faults and races a second round
of hostile cases found. Each case runs the real command line and must answer exit 2 (3 for a
gate) with ``error:`` + ``hint:``, no traceback, no hang, and leave dist/ and the user's files
as they were. The catalogue is docs/HARDENING.md ("Round 2").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import export_for_quantize, make_tiny_project, write_config
from test_hardening import bad, edit, snapshot

from edgebuild.locks import FileLock


def run(args, env=None, cwd=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """The CLI in its own process (a hang fails the test by timeout instead of blocking it)."""
    return subprocess.run([sys.executable, "-m", "edgebuild", *map(str, args)], capture_output=True, text=True,
                          env=env or os.environ.copy(), cwd=cwd, timeout=timeout, **kw)


def sub(r: subprocess.CompletedProcess, *needles, code=2) -> str:
    return bad((r.returncode, r.stdout, r.stderr), *needles, code=code)


# ============================================================================== 1. YAML values
YAML_CASES = {
    # id: (edit, words the error line holds, the text whose line the error must name)
    "impossible-date": (("version: 0.0.1", "version: 2024-02-30"), ["2024-02-30", "timestamp", "day is out of range"], "version:"),
    "bad-tagged-int": (("  epochs: 2", "  epochs: !!int two"), ["'two'", "!!int"], "  epochs:"),
    "bad-tagged-float": (("  lr: 0.05", "  lr: !!float fast"), ["'fast'", "!!float"], "  lr:"),
    "huge-int": (("seed: 0", "seed: " + "9" * 5000), ["!!int", "digits"], "seed:"),
    "bad-tagged-bool": (("  epochs: 2", "  epochs: !!bool maybe"), ["'maybe'", "!!bool"], "  epochs:"),
    "duplicate-top-level-block": (("targets: [x86-onnxruntime-fp32]", "targets: [x86-onnxruntime-fp32]\ntransfer:\n  epochs: 1"),
                                  ["duplicate key 'transfer'", "(first at line"], "transfer:\n  epochs: 1"),
    "duplicate-nested-key": (("  lr: 0.05", "  lr: 0.05\n  lr: 0.5"), ["duplicate key 'lr'"], "  lr: 0.5"),
    "alias-bomb": (("name: tiny", "name: tiny\nx: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef"))), ["expands to more than"], None),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_yaml_value_errors_in_the_build_file(project, cli, case):
    (old, new), needles, at = YAML_CASES[case]
    cfg = edit(project / "edgebuild.yaml", old, new)
    line = bad(cli("build", cfg), *needles)
    assert str(cfg) in line
    if at is not None:
        text = cfg.read_text()
        assert f"line {text[: text.rindex(at)].count(chr(10)) + 1}," in line, (at, line)
    assert not (project / "dist").exists()


@pytest.mark.parametrize("text,needles", [
    ("extends: x86-onnxruntime-fp32\nthreads: 2\nthreads: 4\n", ["duplicate key 'threads'", "line 3"]),
    ("extends: x86-onnxruntime-fp32\ndescription: !!timestamp 2020-13-01\n", ["line 2", "month must be in 1..12"]),
    ("extends: x86-onnxruntime-fp32\nbudgets: {max_size_mb: 1, max_size_mb: 100}\n", ["duplicate key 'max_size_mb'"]),
], ids=["duplicate-key", "bad-date", "duplicate-budget"])
def test_yaml_value_errors_in_a_profile(project, cli, text, needles):
    (project / "targets").mkdir()
    (project / "targets" / "mine.yaml").write_text(text)
    for args in (("build", project / "edgebuild.yaml", "-t", "mine"), ("targets", "show", "mine", "-c", project / "edgebuild.yaml")):
        line = bad(cli(*args), *needles)
        assert "mine.yaml" in line


# ============================================================================== 2. special files
def test_fifo_as_the_build_file_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "edgebuild.yaml")
    sub(run(["build", tmp_path / "edgebuild.yaml"], timeout=120), "not a regular file (a fifo)", "edgebuild.yaml")


def test_fifo_as_the_backbone_file_does_not_hang(project):
    (project / "backbone.py").unlink()
    os.mkfifo(project / "backbone.py")  # importing it would block forever
    sub(run(["build", project / "edgebuild.yaml"], timeout=120), "backbone file is not a regular file (a fifo)")


def test_fifo_as_a_profile_does_not_hang(project):
    (project / "targets").mkdir()
    os.mkfifo(project / "targets" / "mine.yaml")
    sub(run(["build", project / "edgebuild.yaml", "-t", "mine"], timeout=120), "mine.yaml", "fifo")
    sub(run(["targets", "list", "-c", project / "edgebuild.yaml"], timeout=120), "mine.yaml", "fifo")


@pytest.mark.parametrize("kind", ["socket", "device", "broken-link", "link-loop"])
def test_other_special_build_files(tmp_path, cli, kind):
    import socket

    cfg = tmp_path / "edgebuild.yaml"
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(cfg))
        needle = "socket"
    elif kind == "device":
        cfg.symlink_to("/dev/zero")  # would stream zeros forever
        needle = "device"
    elif kind == "broken-link":
        cfg.symlink_to(tmp_path / "gone.yaml")
        needle = "broken symbolic link"
    else:
        cfg.symlink_to(cfg)
        needle = "link loop"
    bad(cli("build", cfg), needle)


# ============================================================================== 3. image formats
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture
def fake_gs(tmp_path):
    """A `gs` first on PATH that leaves a marker if anything runs it (Pillow runs Ghostscript
    to decode PostScript)."""
    bindir, marker = tmp_path / "fakebin", tmp_path / "gs-ran"
    bindir.mkdir()
    (bindir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bindir / "gs").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return env, marker


def test_postscript_in_a_png_never_runs_ghostscript(project, fake_gs):
    env, marker = fake_gs
    (project / "data" / "train" / "a" / "evil.png").write_bytes(EPS)
    line = sub(run(["build", project / "edgebuild.yaml"], env=env), "evil.png", "not an image in a format edgebuild decodes", "PNG, JPEG")
    assert "EPS" not in line.split("allowed:")[1]
    assert not marker.exists()
    assert not (project / "dist").exists()


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "SGI", "IM"])
def test_formats_outside_the_allowlist_are_refused(project, cli, fmt):
    """Formats Pillow decodes but edgebuild does not (less used decoders, some raising
    NotImplementedError), saved under a .png name."""
    Image.new("L" if fmt != "ICO" else "RGB", (16, 16), 90).save(project / "data" / "val" / "a" / "odd.png", format=fmt)
    bad(cli("build", project / "edgebuild.yaml"), "odd.png", "allowed: PNG, JPEG")


# ============================================================================== 4. labels
@pytest.mark.parametrize("sep", ["\x85", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r"],
                         ids=["NEL", "LS", "PS", "FS", "GS", "RS", "VT", "FF", "CR"])
def test_labels_with_any_line_separator_are_refused(project, cli, sep):
    for split in ("train", "val"):
        (project / "data" / split / "a").rename(project / "data" / split / f"x{sep}y")
    line = bad(cli("build", project / "edgebuild.yaml"), "line separators")
    assert ascii(f"x{sep}y") in line  # shown escaped, on one line


def test_class_names_equal_after_normalisation_are_told_apart(project, cli):
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    (project / "data" / "train" / "a").rename(project / "data" / "train" / nfc)
    (project / "data" / "val" / "a").rename(project / "data" / "val" / nfd)
    line = bad(cli("build", project / "edgebuild.yaml"), "only in train: 'caf\\xe9'", "only in val: 'cafe\\u0301'", "Unicode normalisation")
    # and two such folders in one split
    shutil.copytree(project / "data" / "train" / nfc, project / "data" / "train" / nfd)
    line = bad(cli("build", project / "edgebuild.yaml"), "'caf\\xe9'", "'cafe\\u0301'", "same name after Unicode normalisation")
    assert line.count("caf") == 2


# ============================================================================== 5. bounded numbers
BOUND_CASES = {
    "batch-1e9": ("profile", "batch: 1000000000\n", ["'batch'", "between 1 and 4096"]),
    "opset-30": ("profile", "opset: 30\n", ["'opset'", "writes opsets 14 to"]),
    "opset-9": ("profile", "opset: 9\n", ["'opset'", "greater than or equal to 14"]),
    "threads-huge": ("profile", "threads: 100000\n", ["'threads'"]),
    "input-too-big": ("profile", "batch: 4096\n", ["one input of batch 4096", "over the limit"]),
    "std-1e-300": ("build", ("std: [0.5]", "std: [1.0e-300]"), ["preprocess.std", "between 0.001 and 1000"]),
    "mean-huge": ("build", ("mean: [0.5]", "mean: [1.0e+30]"), ["preprocess.mean", "between -1000 and 1000"]),
    "version-huge": ("build", ("version: 0.0.1", "version: '" + "1" * 200 + "'"), ["'version'"]),
}


@pytest.mark.parametrize("case", sorted(BOUND_CASES))
def test_numbers_are_bounded_up_front(project, cli, case):
    where, change, needles = BOUND_CASES[case]
    args = ["build", project / "edgebuild.yaml"]
    if where == "profile":
        (project / "targets").mkdir()
        (project / "targets" / "mine.yaml").write_text("extends: x86-onnxruntime-fp32\n" + change)
        args += ["-t", "mine"]
        if case == "input-too-big":
            edit(project / "edgebuild.yaml", "input_size: [16, 16]", "input_size: [512, 512]")
    else:
        edit(project / "edgebuild.yaml", *change)
    bad(cli(*args), *needles)
    assert not (project / "dist").exists()  # before any training


# ============================================================================== built once
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny project built once for an ONNX Runtime target at opset 20 and an OpenVINO one."""
    root = tmp_path_factory.mktemp("built2")
    project = make_tiny_project(root / "project")
    (project / "targets").mkdir()
    (project / "targets" / "ort20.yaml").write_text("extends: x86-onnxruntime-fp32\nopset: 20\n")
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(root / "cache"))
    r = run(["build", project / "edgebuild.yaml", "-t", "ort20", "-t", "x86-openvino-fp32"], env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"project": project, "dist": project / "dist", "cache": root / "cache", "env": env}


def test_manifest_records_the_opset_produced(built):
    import onnx

    b = built["dist"] / "tiny-ort20"
    m = json.loads((b / "manifest.json").read_text())
    produced = next(o.version for o in onnx.load(str(b / "model.onnx")).opset_import if o.domain in ("", "ai.onnx"))
    assert m["model"]["opset"] == produced == 20 == m["target"]["opset"]
    ov = json.loads((built["dist"] / "tiny-x86-openvino-fp32" / "manifest.json").read_text())
    assert ov["model"]["opset"] == 18


def test_infer_py_decodes_only_the_allowed_formats(built, tmp_path, fake_gs):
    env, marker = fake_gs
    img = tmp_path / "evil.png"
    img.write_bytes(EPS)
    good = tmp_path / "good.png"
    Image.new("L", (16, 16), 30).save(good)
    for bundle in ("tiny-ort20", "tiny-x86-openvino-fp32"):
        infer = built["dist"] / bundle / "infer.py"
        r = subprocess.run([sys.executable, str(infer), str(img)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "evil.png" in r.stderr and "allowed formats: PNG, JPEG" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        r = subprocess.run([sys.executable, str(infer), str(good)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
    assert not marker.exists()


# ============================================================================== 9. validate vs an edited manifest
@pytest.mark.parametrize("edit_manifest,needle", [
    (lambda m: m["target"].update(runtime="openvino", format="openvino"), "model.format 'onnx' but target format 'openvino'"),
    (lambda m: m["model"].update(format="openvino"), "model.format 'openvino'"),
    (lambda m: m["model"].update(files=["model.xml", "model.bin"]), "model.files"),
    (lambda m: m["target"].update(runtime="openvino"), "runtime openvino needs format: openvino"),
    (lambda m: m["model"].update(precision="int4"), "model.precision 'int4'"),
], ids=["runtime-and-format", "model-format", "model-files", "runtime-only", "precision"])
def test_validate_refuses_a_manifest_that_disagrees_with_its_files(built, tmp_path, cli, edit_manifest, needle):
    b = tmp_path / "bundle"
    shutil.copytree(built["dist"] / "tiny-ort20", b)
    m = json.loads((b / "manifest.json").read_text())
    edit_manifest(m)
    (b / "manifest.json").write_text(json.dumps(m))
    assert cli("verify", b)[0] == 0  # the checksums still match: manifest.json is not in its own table
    bad(cli("validate", b), needle)


# ============================================================================== 10. HOME untouched
def _commands():
    """Every command of the CLI, as its path of names (new commands are covered as they come)."""
    from edgebuild.cli import cli as root
    import click

    out = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub_cmd in cmd.commands.items():
                walk(sub_cmd, path + [name])
        else:
            out.append(path)
    walk(root, [])
    return out


def test_every_command_leaves_home_untouched(built, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# decoy\n")
    env = {k: v for k, v in built["env"].items() if not k.startswith(("XDG_", "ORT_", "NNCF_"))}
    env.update(HOME=str(home), EDGEBUILD_CACHE_DIR=str(tmp_path / "cache"))
    project = built["project"]
    dist = tmp_path / "dist"
    real = {
        ("build",): ["build", project / "edgebuild.yaml", "-t", "x86-openvino-int8", "-o", dist],
        ("targets", "list"): ["targets", "list"],
        ("targets", "show"): ["targets", "show", "x86-openvino-int8"],
        ("verify",): ["verify", built["dist"] / "tiny-x86-openvino-fp32.tar.gz"],
        ("validate",): ["validate", built["dist"] / "tiny-x86-openvino-fp32"],
        ("cache", "ls"): ["cache", "ls"],
        ("cache", "clear"): ["cache", "clear"],
    }
    before = snapshot(home)
    ran = []
    for path in _commands():
        args = real.get(tuple(path), [*path, "--help"])
        r = run(args, env=env, cwd=tmp_path, timeout=900)
        assert r.returncode in (0, 3), (args, r.stderr[-2000:])
        ran.append(path)
    for stub in ("tiny-x86-openvino-fp32", "tiny-ort20"):
        r = subprocess.run([sys.executable, str(built["dist"] / stub / "infer.py"), "--selftest"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
    assert ["build"] in ran and ["targets", "list"] in ran
    assert snapshot(home) == before, sorted(set(snapshot(home)) ^ set(before))
    assert not (home / "intel").exists() and not (home / ".cache").exists()


# ============================================================================== 6. cache faults
def test_a_folder_that_is_not_a_cache_is_never_used_or_cleared(project, cli, tmp_path):
    mine = tmp_path / "my-files"
    (mine / "transfer").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work\n")
    (mine / "transfer" / "notes.txt").write_text("keep\n")
    before = snapshot(mine)
    bad(cli("cache", "clear", "--cache-dir", mine), "is not an edgebuild cache", "nothing was removed")
    bad(cli("build", project / "edgebuild.yaml", "--cache-dir", mine), "is not an edgebuild cache")
    assert snapshot(mine) == before
    assert not (project / "dist").exists()  # refused before training


def _entry(cache: Path, stage: str) -> Path:
    return next(p for p in (cache / stage).iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["file-for-stage-folder", "file-for-entry", "fifo-entry-json", "entry-json-folder",
                                    "garbage-entry-json", "fifo-inside-entry"])
def test_damaged_cache_is_dropped_and_rebuilt(project, cli, tmp_path, damage):
    cache = tmp_path / "cache"
    assert cli("build", project / "edgebuild.yaml", "--cache-dir", cache)[0] == 0
    assert (cache / "edgebuild-cache.json").is_file() and (cache / "CACHEDIR.TAG").is_file()  # the cache says what it is
    e = _entry(cache, "export")
    if damage == "file-for-stage-folder":
        shutil.rmtree(cache / "export")
        (cache / "export").write_text("not a folder")
    elif damage == "file-for-entry":
        shutil.rmtree(e)
        e.write_text("not a folder")
    elif damage == "fifo-entry-json":
        (e / "entry.json").unlink()
        os.mkfifo(e / "entry.json")  # reading it would block forever
    elif damage == "entry-json-folder":
        (e / "entry.json").unlink()
        (e / "entry.json").mkdir()
    elif damage == "garbage-entry-json":
        (e / "entry.json").write_bytes(b"\xff\x00{")
    else:
        os.mkfifo(e / "model.onnx.fifo")
        (e / "model.onnx").unlink()
    r = run(["build", project / "edgebuild.yaml", "--cache-dir", cache, "-o", tmp_path / "out"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr or "not a folder" in r.stderr or damage == "file-for-stage-folder"
    assert "running export" in r.stderr and "Traceback" not in r.stderr
    assert cli("verify", tmp_path / "out" / "tiny-x86-onnxruntime-fp32")[0] == 0


@pytest.mark.slow
def test_a_full_disk_under_the_cache_is_exit_2(project, tmp_path):
    """A write limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) makes the
    first stage entry fail: exit 2 naming the cache folder, not a traceback; nothing half-written."""
    import resource

    cache = tmp_path / "cache"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    r = run(["build", project / "edgebuild.yaml", "--cache-dir", cache], preexec_fn=limit)
    line = sub(r, "cache folder", "disk is full")
    assert str(cache) in line
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]
    assert not (project / "dist").exists()


# ============================================================================== 7. concurrent builds
@pytest.mark.slow
def test_a_second_build_waits_or_names_the_holder(project, cli, tmp_path):
    assert cli("build", project / "edgebuild.yaml")[0] == 0
    dist = project / "dist"
    with FileLock(dist / ".lock", "test"):  # this process holds dist/ as another build would
        r = run(["build", project / "edgebuild.yaml", "--no-wait"])
        line = sub(r, f"PID {os.getpid()}", str(dist))
        waiting = subprocess.Popen([sys.executable, "-m", "edgebuild", "build", project / "edgebuild.yaml"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t_end = time.time() + 120
        seen = ""
        while f"waiting for PID {os.getpid()}" not in seen and time.time() < t_end:
            seen += waiting.stderr.readline()
        assert f"waiting for PID {os.getpid()}" in seen
        time.sleep(1)
        assert waiting.poll() is None  # still waiting while the lock is held
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert cli("verify", dist / "tiny-x86-onnxruntime-fp32.tar.gz")[0] == 0


@pytest.mark.slow
def test_two_builds_at_once_into_one_folder_and_cache(project, tmp_path):
    """Cold cache, same output: both succeed, one after the other where they share anything."""
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "edgebuild", "build", str(project / "edgebuild.yaml"), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert json.loads(out)["status"] == "ok"
    dist = project / "dist"
    from edgebuild.verify import verify_bundle

    verify_bundle(dist / "tiny-x86-onnxruntime-fp32")
    verify_bundle(dist / "tiny-x86-onnxruntime-fp32.tar.gz")
    assert [p.name for p in (dist / ".generations").iterdir()] == [os.readlink(dist / ".current").split("/")[-1]]
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")]


# ============================================================================== 8. publishing
def test_a_failed_build_leaves_the_published_dist_alone(project, cli):
    assert cli("build", project / "edgebuild.yaml")[0] == 0
    dist = project / "dist"
    before = published(dist)
    write_config(project, extra="budgets:\n  max_latency_ms: 0.000001\n")
    line = bad(cli("build", project / "edgebuild.yaml"), "gate(s) failed", "is unchanged",
               str(dist / "failed-report.html"), code=3)
    assert published(dist) == before
    failed = json.loads((dist / "failed-report.json").read_text())
    assert failed["status"] == "failed" and json.loads((dist / "report.json").read_text())["status"] == "ok"
    code, out, _ = cli("build", project / "edgebuild.yaml", "--json")
    assert code == 3 and json.loads(out)["status"] == "failed"  # --json prints the failed build's report
    write_config(project)
    assert cli("build", project / "edgebuild.yaml")[0] == 0
    assert not (dist / "failed-report.json").exists()  # the published build is newer than that failure


def published(dist: Path) -> dict:
    """What a user sees in dist/: every published name (links followed) with its content's hash."""
    import hashlib

    out = {}
    for p in sorted(dist.iterdir()):
        if p.name.startswith(".") or p.name.startswith("failed-report"):
            continue
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[f.relative_to(dist).as_posix() if f != p else p.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_the_old_layout_is_adopted_without_a_gap(project, cli):
    """A dist/ written by an edgebuild before generations (real folders and files) is taken over:
    the same names keep working, pointing into a generation."""
    assert cli("build", project / "edgebuild.yaml")[0] == 0
    dist = project / "dist"
    # turn it back into the old layout
    gen = Path(os.path.realpath(dist / ".current"))
    for p in list(dist.iterdir()):
        if p.is_symlink() and not p.name.startswith("."):
            target = Path(os.path.realpath(p))
            p.unlink()
            shutil.move(str(target), str(p))
    shutil.rmtree(gen.parent)
    (dist / ".current").unlink()
    (dist / "notes.txt").write_text("the user's\n")
    write_config(project, epochs=3)
    assert cli("build", project / "edgebuild.yaml")[0] == 0
    assert (dist / "tiny-x86-onnxruntime-fp32").is_symlink() and (dist / "report.json").is_symlink()
    assert (dist / "notes.txt").read_text() == "the user's\n" and not (dist / "notes.txt").is_symlink()
    assert cli("verify", dist / "tiny-x86-onnxruntime-fp32")[0] == 0


# ============================================================================== the guard acts on every accuracy-type gate
@pytest.mark.parametrize("gate", ["min_agreement", "min_accuracy"])
def test_guard_acts_on_every_accuracy_gate(tmp_path, gate):
    """No accuracy-drop budget, only min_agreement (or min_accuracy): plain int8 agrees with the
    reference (and the labels) on about a third of the inputs, so the guard tries the remedy,
    which gets all of them."""
    from edgebuild.stages import quantize as quantize_stage
    from test_guard import data, model, onnx_accuracy

    prof, edir, out = export_for_quantize(tmp_path, model())
    X, y = data()
    ref = np.eye(3, dtype=np.float32)[y] * 6.4  # the float model's logits, by hand: it is exact
    measured = "agreement" if gate == "min_agreement" else "accuracy"
    meta = quantize_stage.run(prof, edir, out, X, Xval=X, yval=y, ref_logits=ref, **{gate: 0.99})
    plain, remedy = meta["attempts"]
    assert plain[measured] < 0.6 and plain["within_budget"] is False
    assert remedy[measured] == 1.0 and remedy["within_budget"] is True
    assert meta["decision"] == "int8" and meta["guard"][gate] == 0.99 and meta[measured] == 1.0
    assert onnx_accuracy(out / "model.onnx", X, y) == 1.0  # the shipped file is the remedy's
    # unreachable with fallback 'fail': a failed gate names it
    out2 = tmp_path / "quant2"
    out2.mkdir()
    meta = quantize_stage.run(prof.model_copy(update={"fallback": "fail"}), edir, out2, X, Xval=X, yval=y, ref_logits=ref, **{gate: 1.01})
    rows = quantize_stage.guard_gate_rows("t", meta)
    assert meta["decision"] == "fail" and [r["budget"] for r in rows if r["verdict"] == "FAIL"] == [f"int8 accuracy guard ({gate}, fallback: fail)"]


# ============================================================================== list files (.csv, .jsonl)
LIST_CASES = {
    # id: (list file name, text after a good first row, words the error line holds)
    "jsonl-duplicate-label": ("train.jsonl", '{"path": "imgs/b/img000.png", "label": "b", "label": "a"}\n', ["train.jsonl:2", "duplicate key 'label'"]),
    "jsonl-duplicate-path": ("train.jsonl", '{"path": "imgs/b/img000.png", "label": "b", "path": "imgs/a/img001.png"}\n', ["train.jsonl:2", "duplicate key 'path'"]),
    "jsonl-nan": ("train.jsonl", '{"path": "imgs/b/img000.png", "label": NaN}\n', ["train.jsonl:2", "NaN"]),
    "jsonl-huge-int": ("train.jsonl", '{"path": "imgs/b/img000.png", "label": ' + "7" * 5000 + "}\n", ["train.jsonl:2"]),
    "jsonl-deep": ("train.jsonl", "[" * 100000 + "\n", ["train.jsonl:2"]),
    "jsonl-line-separator-label": ("train.jsonl", '{"path": "imgs/b/img000.png", "label": "b\\u2028c"}\n', ["train.jsonl:2", "label"]),
    "csv-nul": ("train.csv", "imgs/b/img000.png,b\x00\n", ["train.csv:3", "label"]),
    "csv-huge-field": ("train.csv", "imgs/b/img000.png,\"" + "b" * 200000 + "\"\n", ["train.csv:", "not a readable CSV row"]),
    "csv-next-line-label": ("train.csv", "imgs/b/img000.png,b\x85c\n", ["train.csv:3", "label"]),
}


@pytest.mark.parametrize("case", sorted(LIST_CASES))
def test_hostile_list_files(project, cli, case):
    name, rest, needles = LIST_CASES[case]
    lst = project / "data" / name
    (project / "data" / "imgs").mkdir()
    for c in ("a", "b"):
        shutil.copytree(project / "data" / "train" / c, project / "data" / "imgs" / c)
    first = '{"path": "imgs/a/img000.png", "label": "a"}\n' if name.endswith(".jsonl") else "path,label\nimgs/a/img000.png,a\n"
    lst.write_bytes((first + rest).encode("utf-8", "surrogatepass"))
    edit(project / "edgebuild.yaml", "train: data/train", f"train: data/{name}")
    bad(cli("build", project / "edgebuild.yaml"), *needles)


def test_fifo_as_a_list_file_does_not_hang(project):
    os.mkfifo(project / "data" / "train.csv")
    edit(project / "edgebuild.yaml", "train: data/train", "train: data/train.csv")
    sub(run(["build", project / "edgebuild.yaml"], timeout=120), "train.csv", "fifo")
