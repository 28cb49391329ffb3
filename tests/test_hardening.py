"""Hardening: every bad input gets a clear answer, no untrusted file runs code, nothing is lost.

Each case goes through the command line (``edgebuild.cli.main`` in-process) and must answer
exit 2 (bad input) or 3 (a gate), one ``error:`` line naming the file/field/layer and one
``hint:`` line, and no traceback unless ``-v``. The catalogue, with the older tests it reuses
(test_config.py, test_data.py, test_backbones.py, test_verify.py, test_build.py,
test_interrupts.py, test_bundle.py), is docs/HARDENING.md.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_images, make_tiny_project
from test_verify import _evil_archive, make_bundle

from edgebuild.stages.bundle import make_archive


def bad(result, *needles, code=2):
    """The contract of a refused input: exit code, error: + hint: lines, no traceback."""
    rc, out, err = result
    assert rc == code, (rc, out, err)
    lines = [l for l in err.splitlines() if l.startswith(("error: ", "hint: "))]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def edit(cfg: Path, old: str, new: str) -> Path:
    text = cfg.read_text()
    assert old in text, old
    cfg.write_text(text.replace(old, new))
    return cfg


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb, never decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


# ============================================================================== build file
CONFIG_CASES = {
    # id: (edit of the tiny build file, words the error line must hold)
    "wrong-type": (("  epochs: 2", "  epochs: [2]"), ["transfer.epochs", "list"]),
    "bool-for-number": (("  epochs: 2", "  epochs: yes"), ["transfer.epochs", "boolean"]),
    "nan-mean": (("mean: [0.5]", "mean: [.nan]"), ["preprocess.mean", "finite"]),
    "out-of-range-size": (("input_size: [16, 16]", "input_size: [16, 0]"), ["preprocess.input_size", "between 1 and 8192"]),
    "out-of-range-lr": (("lr: 0.05", "lr: -1"), ["transfer.lr", "greater than 0"]),
    "misspelled-provider": (("python:backbone.py:build", "pyton:backbone.py:build"), ["backbone.source", "did you mean 'python'"]),
    "misspelled-choice": (("color: grayscale", "color: greyscale"), ["preprocess.color", "did you mean 'grayscale'"]),
    "misspelled-target": (("[x86-onnxruntime-fp32]", "[x86-onnxruntme-fp32]"), ["unknown target", "did you mean 'x86-onnxruntime-fp32'"]),
    "unknown-nested-key": (("  batch_size: 16", "  batchsize: 16"), ["transfer.batchsize", "did you mean 'batch_size'"]),
    "missing-section": (("data:\n  train: data/train\n  val: data/val\n", ""), ["'data' is required"]),
    "yaml-syntax": (("preprocess:\n", "preprocess: [\n"), ["line ", "YAML syntax error"]),
    "python-tag": (("name: tiny", "name: !!python/object/apply:os.system ['touch pwned']"), ["YAML tag", "not allowed"]),
    "bad-name": (("name: tiny", "name: ../../etc"), ["'name'", "letters, digits"]),
    "control-char-key": (("  lr: 0.05", "  \"l\\nr\": 0.05"), ["transfer.l\\nr"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_build_file(project, cli, case):
    (old, new), needles = CONFIG_CASES[case]
    cfg = edit(project / "edgebuild.yaml", old, new)
    line = bad(cli("build", cfg), *needles)
    if case != "misspelled-target":
        assert str(cfg) in line  # names the file
    assert not (project / "pwned").exists() and not (project / "dist").exists()


def test_yaml_syntax_error_names_the_line(project, cli):
    cfg = project / "edgebuild.yaml"
    cfg.write_text("name: tiny\nversion: 0.1\nbackbone: {source: python:backbone.py:build\ndata: {}\n")
    line = bad(cli("build", cfg), "YAML syntax error")
    assert "line 4" in line or "line 3" in line


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"- a\n- b\n", "mapping"), (b"\xff\xfe\x00", "UTF-8"),
                                            (b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply")],
                         ids=["empty", "not-a-mapping", "not-utf8", "deep-nesting"])
def test_degenerate_build_files(tmp_path, cli, content, needle):
    cfg = tmp_path / "edgebuild.yaml"
    cfg.write_bytes(content)
    bad(cli("build", cfg), needle, str(cfg))


def test_missing_build_file_and_folder_given(tmp_path, cli):
    bad(cli("build", tmp_path / "nope.yaml"), "not found")
    bad(cli("build", tmp_path), "is a directory")  # Click's check, in edgebuild's format


def test_usage_errors_use_the_same_format(cli):
    bad(cli("bild"), "No such command", "build")
    bad(cli("build", "--no-such-flag"), "no-such-flag")
    bad(cli("verify"), "Missing argument")


def test_output_folder_under_a_file(project, cli):
    (project / "afile").write_text("x")
    bad(cli("build", project / "edgebuild.yaml", "-o", project / "afile" / "dist"), "afile", "is not a folder")


def test_verbose_shows_the_traceback(project, cli):
    edit(project / "edgebuild.yaml", "  epochs: 2", "  epochs: many")
    rc, _, err = cli("-v", "build", project / "edgebuild.yaml")
    assert rc == 2 and "error: " in err and "hint: " in err and "Traceback" in err


def test_bad_user_target_profile(project, cli):
    (project / "targets").mkdir()
    (project / "targets" / "mine.yaml").write_text("extends: x86-onnxruntime-fp32\nbatch: dynamc\nthreads: -1\n")
    bad(cli("build", project / "edgebuild.yaml", "-t", "mine"), "mine.yaml", "'batch'", "did you mean 'dynamic'", "'threads'")


# ============================================================================== data
def _data_case(project: Path, case: str) -> tuple[list[str], Path]:
    train = project / "data" / "train"
    a = train / "a"
    if case == "empty-class":
        (train / "d").mkdir()
        return ["'d' has no images"], train / "d"
    if case == "classes-differ":
        shutil.move(str(project / "data" / "val" / "c"), str(project / "data" / "val" / "x"))
        return ["different classes", "only in train: c", "only in val: x"], project
    if case == "truncated-png":
        data = (a / "img000.png").read_bytes()
        (a / "img000.png").write_bytes(data[: len(data) // 2])
        return ["img000.png", "truncated"], a / "img000.png"
    if case == "text-as-png":
        (a / "notes.png").write_text("this is not an image")
        return ["notes.png", "not an image"], a / "notes.png"
    if case == "non-image-extension":
        (a / "labels.csv").write_text("x,y\n")
        return ["labels.csv", "not an image file"], a / "labels.csv"
    if case == "decompression-bomb":
        (a / "bomb.png").write_bytes(png_header_only(20000, 20000))
        return ["bomb.png", "400000000 pixels", "decompression bomb"], a / "bomb.png"
    if case == "fifo":
        os.mkfifo(a / "pipe.png")  # reading it would block the build forever
        return ["pipe.png", "fifo"], a / "pipe.png"
    if case == "broken-symlink":
        (a / "gone.png").symlink_to(project / "deleted.png")
        return ["gone.png", "broken symbolic link"], a / "gone.png"
    if case == "self-symlink":
        (a / "self.png").symlink_to(a / "self.png")
        return ["self.png", "loop"], a / "self.png"
    if case == "dir-symlink-loop":
        (a / "again").symlink_to(a)
        return ["again", "symlink loop"], a / "again"
    if case == "newline-label":
        (train / "bad\nlabel").mkdir()
        make_images(train / "bad\nlabel", {".": 1})
        return ["control characters", "bad\\nlabel"], train
    if case == "no-classes":
        for d in train.iterdir():
            shutil.rmtree(d)
        return ["no class sub-folders"], train
    if case == "data-missing":
        shutil.rmtree(project / "data" / "val")
        return ["val folder not found"], project / "data" / "val"
    if case == "undecodable-name":
        name = os.fsdecode(b"bad\xff.png")
        (a / name).write_bytes(b"garbage")
        return ["bad\\udcff.png", "not an image"], a
    raise AssertionError(case)


DATA_CASES = ["empty-class", "classes-differ", "truncated-png", "text-as-png", "non-image-extension", "decompression-bomb",
              "fifo", "broken-symlink", "self-symlink", "dir-symlink-loop", "newline-label", "no-classes", "data-missing",
              "undecodable-name"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data(project, cli, case):
    needles, _ = _data_case(project, case)
    bad(cli("build", project / "edgebuild.yaml"), *needles)
    assert not (project / "dist").exists()  # refused before anything was written


def test_unreadable_image_file(project, cli):
    """Permission-denied files: honest only where permissions bind (as root they do not)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop reads (fifo and broken-link cases cover unreadable entries)")
    f = project / "data" / "train" / "a" / "img000.png"
    f.chmod(0)
    try:
        bad(cli("build", project / "edgebuild.yaml"), "img000.png")
    finally:
        f.chmod(0o644)


def test_every_image_mode_is_accepted(project, cli, tmp_path):
    """Grayscale, RGB, RGBA, palette (with transparency), 16-bit and 1-bit images all decode."""
    a = project / "data" / "train" / "a"
    Image.new("RGBA", (20, 12), (10, 200, 30, 128)).save(a / "rgba.png")
    p = Image.new("P", (16, 16))
    p.putpalette([i % 256 for i in range(768)])
    p.info["transparency"] = 0
    p.save(a / "palette.png", transparency=0)
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(a / "deep16.png")
    Image.new("1", (16, 16), 1).save(a / "mono.png")
    Image.new("RGB", (64, 8), (1, 2, 3)).save(a / "wide.jpg")
    Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(a / "cmyk.tif")
    rc, out, err = cli("build", project / "edgebuild.yaml", "-o", tmp_path / "out")
    assert rc == 0, err


# ============================================================================== weights
def test_weights_missing(project, cli):
    (project / "backbone.safetensors").unlink()
    bad(cli("build", project / "edgebuild.yaml"), "weights file not found", "backbone.safetensors")


def test_weights_truncated(project, cli):
    w = project / "backbone.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    bad(cli("build", project / "edgebuild.yaml"), "backbone.safetensors", "not a valid safetensors")


def test_weights_wrong_shapes_list_the_keys(project, cli):
    from safetensors.torch import load_file, save_file
    import torch

    w = project / "backbone.safetensors"
    sd = load_file(str(w))
    sd["fc.weight"] = torch.zeros(7, 16)
    sd["body.0.weight"] = torch.zeros(8, 1, 5, 5)
    del sd["fc.bias"]
    save_file(sd, str(w))
    line = bad(cli("build", project / "edgebuild.yaml"), "do not fit the backbone", "missing: fc.bias")
    assert "fc.weight (7, 16) vs model (4, 16)" in line and "body.0.weight (8, 1, 5, 5) vs model (8, 1, 3, 3)" in line


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_unrun(project, cli):
    import pickle

    marker = project / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    with open(project / "backbone.pt", "wb") as f:
        pickle.dump({"fc.weight": evil}, f)
    edit(project / "edgebuild.yaml", "weights: backbone.safetensors", "weights: backbone.pt")
    bad(cli("build", project / "edgebuild.yaml"), "backbone.pt", "refused, not loaded")
    assert not marker.exists()


def test_torch_save_of_a_code_object_is_refused_naming_it(project, cli):
    import torch

    class Calls:
        def __reduce__(self):
            return (eval, ("1",))

    torch.save({"fc.weight": Calls()}, project / "backbone.pt")
    edit(project / "edgebuild.yaml", "weights: backbone.safetensors", "weights: backbone.pt")
    bad(cli("build", project / "edgebuild.yaml"), "refused, not loaded", "eval")


@pytest.mark.parametrize("kind", ["folder", "fifo", "junk-pt", "not-a-state-dict", "unknown-format"])
def test_weights_odd_files(project, cli, kind):
    cfg = project / "edgebuild.yaml"
    if kind == "folder":
        (project / "w.pt").mkdir()
        needle = "not a regular file"
    elif kind == "fifo":
        os.mkfifo(project / "w.pt")
        needle = "not a regular file"
    elif kind == "junk-pt":
        (project / "w.pt").write_bytes(b"\x00garbage" * 10)
        needle = "w.pt"
    elif kind == "not-a-state-dict":
        import torch

        torch.save([torch.zeros(2)], project / "w.pt")
        needle = "not a state dict of tensors"
    else:
        (project / "w.onnx").write_bytes(b"x")
        edit(cfg, "weights: backbone.safetensors", "weights: w.onnx")
        bad(cli("build", cfg), "unsupported weights format '.onnx'")
        return
    edit(cfg, "weights: backbone.safetensors", "weights: w.pt")
    bad(cli("build", cfg), needle)


# ============================================================================== models
ODD_BACKBONE = '''

class Odd(nn.Module):
    """Trains fine, but its op (an SVD) has no ONNX conversion."""

    def forward(self, x):
        with torch.no_grad():
            s = torch.linalg.svdvals(x.flatten(2)[:, :, :4].reshape(x.shape[0], -1, 2, 2))
        return x + 0 * s.sum()


class WithOdd(Tiny):
    def __init__(self):
        super().__init__(1, 4)
        self.stem = nn.Sequential(nn.Identity(), Odd())

    def forward(self, x):
        return self.fc(self.body(self.stem(x)))


def build_odd():
    return WithOdd()
'''


def test_unconvertible_op_names_op_and_module(project, cli):
    with open(project / "backbone.py", "a") as f:
        f.write(ODD_BACKBONE)
    cfg = edit(project / "edgebuild.yaml", "python:backbone.py:build", "python:backbone.py:build_odd")
    edit(cfg, "  epochs: 2", "  epochs: 1")
    line = bad(cli("build", cfg), "ONNX export failed", "aten._linalg_svd", "module 'stem.1' (Odd)")
    assert "\x1b[" not in line  # no terminal colour codes from the exporter


def test_untraceable_module_is_named(tmp_path):
    """Data-dependent control flow fails in torch.export (step 1): the module is still named."""
    import torch
    from torch import nn

    from edgebuild.errors import ModelError
    from edgebuild.stages.export import export_onnx

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(nn.ReLU(), Branchy()), nn.Flatten())
    with pytest.raises(ModelError) as ei:
        export_onnx(model, torch.zeros(1, 1, 4, 4), tmp_path / "m.onnx", 18, 1)
    assert "in module '1.1' (Branchy)" in ei.value.message and "\n" not in ei.value.message


def test_head_that_does_not_exist(project, cli):
    edit(project / "edgebuild.yaml", "classifier: fc", "classifier: fc2")
    bad(cli("build", project / "edgebuild.yaml"), "classifier 'fc2' not found", "did you mean 'fc'")


def test_factory_that_is_missing(project, cli):
    edit(project / "edgebuild.yaml", "python:backbone.py:build", "python:backbone.py:biuld")
    bad(cli("build", project / "edgebuild.yaml"), "'biuld' not found", "did you mean 'build'")


# ============================================================================== bundles
def verify(cli, path):
    return cli("verify", path)


@pytest.mark.parametrize("damage,needle", [("altered", "altered: model.onnx"), ("missing", "missing: labels.txt"),
                                           ("extra", "not in manifest: run.sh"), ("unknown-schema", "unknown manifest schema"),
                                           ("manifest-garbage", "not valid JSON"), ("no-manifest", "no manifest.json"),
                                           ("fifo-inside", "special file"), ("symlink-inside", "symbolic link"),
                                           ("manifest-symlink", "symbolic link")])
def test_bad_bundle_folder(tmp_path, cli, damage, needle):
    b = make_bundle(tmp_path, schema="edgebuild.bundle/7" if damage == "unknown-schema" else "edgebuild.bundle/1")
    if damage == "altered":
        (b / "model.onnx").write_bytes(b"\xff" + (b / "model.onnx").read_bytes()[1:])
    elif damage == "missing":
        (b / "labels.txt").unlink()
    elif damage == "extra":
        (b / "run.sh").write_text("rm -rf ~\n")
    elif damage == "manifest-garbage":
        (b / "manifest.json").write_text("{not json")
    elif damage == "no-manifest":
        (b / "manifest.json").unlink()
    elif damage == "fifo-inside":
        os.mkfifo(b / "pipe")
    elif damage == "symlink-inside":
        (b / "passwd").symlink_to("/etc/passwd")
    elif damage == "manifest-symlink":
        real = tmp_path / "elsewhere.json"
        (b / "manifest.json").rename(real)
        (b / "manifest.json").symlink_to(real)
    bad(verify(cli, b), needle)


@pytest.mark.parametrize("kind,needle", [("dotdot", "escapes its folder"), ("absolute", "absolute path"), ("symlink", "is a link"),
                                         ("hardlink", "is a link"), ("device", "device"), ("fifo", "fifo")])
def test_hostile_archive_entries(tmp_path, cli, kind, needle):
    archive = tmp_path / "evil.tar.gz"
    _evil_archive(archive, kind)
    bad(verify(cli, archive), "refused", needle)


@pytest.mark.parametrize("damage,needle", [("truncated", "not a readable"), ("garbage", "not a readable"),
                                           ("sidecar-mismatch", "does not match"), ("two-folders", "more than one top folder"),
                                           ("backslash", "backslash"), ("unknown-schema", "unknown manifest schema"),
                                           ("gzip-header-only", "truncated compression header")])
def test_bad_bundle_archive(tmp_path, cli, damage, needle):
    b = make_bundle(tmp_path / "src", schema="edgebuild.bundle/0" if damage == "unknown-schema" else "edgebuild.bundle/1")
    archive = tmp_path / "demo-t.tar.gz"
    make_archive(b, archive, "demo-t")
    raw = archive.read_bytes()
    if damage == "truncated":
        (tmp_path / "demo-t.tar.gz.sha256").unlink(missing_ok=True)
        archive.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        archive.write_bytes(os.urandom(300))
        (tmp_path / "demo-t.tar.gz.sha256").unlink(missing_ok=True)
    elif damage == "gzip-header-only":  # found by fuzzing: Python's tarfile raised TypeError here
        (tmp_path / "demo-t.tar.gz.sha256").unlink(missing_ok=True)
        archive.write_bytes(b"\x1f\x8b\x08")
    elif damage == "sidecar-mismatch":
        archive.write_bytes(raw + b"\0")
    elif damage in ("two-folders", "backslash"):
        (tmp_path / "demo-t.tar.gz.sha256").unlink(missing_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(b, arcname="demo-t")
            ti = tarfile.TarInfo("other/x" if damage == "two-folders" else "demo-t\\sub\\evil.txt")
            ti.size = 1
            tar.addfile(ti, io.BytesIO(b"x"))
    bad(verify(cli, archive), needle)


def test_verify_of_a_fifo_does_not_block(tmp_path, cli):
    os.mkfifo(tmp_path / "bundle.tar.gz")
    bad(verify(cli, tmp_path / "bundle.tar.gz"), "not a regular file")


def test_validate_refuses_what_verify_refuses(tmp_path, cli):
    archive = tmp_path / "evil.tar.gz"
    _evil_archive(archive, "dotdot")
    bad(cli("validate", archive), "refused")
    assert not (tmp_path.parent / "escaped.txt").exists()


# ============================================================================== output safety
def snapshot(*roots: Path, skip: tuple[Path, ...] = ()) -> dict:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
            for n in dirnames + filenames:
                p = Path(dirpath, n)
                if p in skip:
                    continue
                st = os.lstat(p)
                out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


HOSTILE_CLASSES = ["a..b", "-rf", "it's \"quoted\"", "$(touch pwned)", "; rm -rf ~ #", "{{ 7*7 }}", "名字 é"]
ODD_PROFILE = "we'ird $(touch pwned);x"


@pytest.fixture(scope="module")
def hostile_safety_build(tmp_path_factory):
    """A build (own process: imports happen inside it) with hostile class names and an odd user
    profile name, a decoy HOME and a separate cwd; snapshots of everything but -o and the cache."""
    tmp_path = tmp_path_factory.mktemp("safety")
    project = make_tiny_project(tmp_path / "project")
    for split in ("train", "val"):
        root = project / "data" / split
        for old, new in zip(sorted(p.name for p in root.iterdir()), HOSTILE_CLASSES):
            (root / old).rename(root / new)
        make_images(root, {name: 3 for name in HOSTILE_CLASSES[3:]}, seed=3)
    (project / "targets").mkdir()
    (project / "targets" / f"{ODD_PROFILE}.yaml").write_text("extends: x86-onnxruntime-fp32\ndescription: \"odd $(x) 'name'\"\n")
    home, work, out, cache = tmp_path / "home", tmp_path / "work", tmp_path / "out", tmp_path / "cache"
    for d in (home, work):
        d.mkdir()
    (home / ".bashrc").write_text("# decoy\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_"))}
    env.update(HOME=str(home), EDGEBUILD_CACHE_DIR=str(cache))
    before = snapshot(tmp_path, skip=(out, cache))
    r = subprocess.run([sys.executable, "-m", "edgebuild", "build", str(project / "edgebuild.yaml"), "-t", ODD_PROFILE, "-o", str(out)],
                       capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    after = snapshot(tmp_path, skip=(out, cache))
    return {"root": tmp_path, "home": home, "work": work, "out": out, "cache": cache, "env": env, "before": before, "after": after,
            "bundle": out / f"tiny-{ODD_PROFILE}"}


def test_build_writes_only_into_out_and_cache(hostile_safety_build):
    """Project folder and cwd unchanged; the bundle and its archive exist under -o, with every
    hostile label intact (hostile labels inside generated code: tests/test_bundle.py::test_hostile_labels_*)."""
    b = hostile_safety_build
    home = str(b["home"])
    changed = sorted(p for p in set(b["after"]) ^ set(b["before"]) | {p for p in b["after"] if b["before"].get(p) != b["after"][p]}
                     if not p.startswith(home))
    assert changed == []
    assert b["bundle"].is_dir() and (b["out"] / f"tiny-{ODD_PROFILE}.tar.gz").is_file()
    assert (b["bundle"] / "labels.txt").read_text(encoding="utf-8").splitlines() == sorted(HOSTILE_CLASSES)
    assert not list(b["root"].rglob("pwned"))


def test_build_leaves_home_alone(hostile_safety_build):
    b = hostile_safety_build
    home = str(b["home"])
    assert {p: v for p, v in b["after"].items() if p.startswith(home)} == {p: v for p, v in b["before"].items() if p.startswith(home)}


def test_verify_writes_nothing(hostile_safety_build):
    b = hostile_safety_build
    before = snapshot(b["root"])
    for target in (b["bundle"], b["out"] / f"tiny-{ODD_PROFILE}.tar.gz"):
        r = subprocess.run([sys.executable, "-m", "edgebuild", "verify", str(target)], capture_output=True, text=True, cwd=b["work"], env=b["env"])
        assert r.returncode == 0 and "files match the manifest" in r.stdout, r.stderr
    assert snapshot(b["root"]) == before


def test_stub_evaluates_no_label(hostile_safety_build):
    b = hostile_safety_build
    r = subprocess.run([sys.executable, str(b["bundle"] / "infer.py"), "--selftest"], capture_output=True, text=True, cwd=b["work"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(b["root"].rglob("pwned"))
