"""Bundles: stub preprocessing parity (Python and C++), hostile labels and names end to end,
deterministic archives, the escaping filters."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgebuild.config import PreprocessConfig
from edgebuild.data import preprocess_image
from edgebuild.render import cpp_float, cpp_int, cpp_string, render

REPO = Path(__file__).resolve().parent.parent
CPP_TEMPLATES = REPO / "templates" / "cpp"
DRIVER = Path(__file__).resolve().parent / "fixtures" / "bundle" / "preprocess_driver.cpp"

COLORS = ["rgb", "bgr", "grayscale"]
RESIZES = ["stretch", "letterbox", "center-crop"]
SIZES = [(32, 32), (24, 40)]  # (height, width)
# class folder names cannot hold "/", so "*/" is exercised through the version string instead
HOSTILE_LABELS = sorted(['naïve "quote"', "back\\slash", "{{ 7*7 }}", "日本語", "it's", "{% raw %} \"\"\" ${x} ?""?=", "<b>x<\\b> `y` *z*"])


def norm(color):
    return ([0.5], [0.25]) if color == "grayscale" else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def make_test_images(folder: Path) -> list[Path]:
    """Odd sizes, up- and downscaling, every decoded mode the stubs handle."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for w, h in [(37, 23), (5, 61), (45, 45), (250, 131), (1, 3)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        alpha[0, 0] = 0
        images = {
            "rgb": Image.fromarray(rgb, "RGB"),
            "l": Image.fromarray(rgb[..., 0], "L"),
            "rgba": Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"),
            "la": Image.fromarray(np.concatenate([rgb[..., :1], alpha], 2), "LA"),
            "p": Image.fromarray(rgb, "RGB").quantize(17),
            "i16": Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)),
        }
        for kind, im in images.items():
            p = folder / f"{kind}_{w}x{h}.png"
            im.save(p)
            out.append(p)
        p = folder / f"ptrans_{w}x{h}.png"
        images["p"].save(p, transparency=3)
        out.append(p)
    return out


def render_infer(tmp_path: Path, preprocess: dict, name="m") -> Path:
    ctx = dict(
        edgebuild_version="test", title=name, name=name, version="1", target="t", runtime="onnxruntime",
        runtime_package="onnxruntime", model_file="model.onnx", device="CPU", precision="fp32", threads=1,
        providers=["CPUExecutionProvider"], inference_precision="f32", preprocess=preprocess,
        preprocess_source=(REPO / "edgebuild" / "preprocess.py").read_text(encoding="utf-8").strip(),
    )
    path = tmp_path / f"infer_{abs(hash(json.dumps(preprocess)))}.py"
    path.write_text(render("infer.py.j2", **ctx), encoding="utf-8")
    return path


def import_stub(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- Python stub == edgebuild
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_test_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("resize", RESIZES)
def test_python_stub_preprocessing_matches_edgebuild(tmp_path, images, color, resize):
    worst = 0.0
    for size in SIZES:
        mean, std = norm(color)
        cfg = PreprocessConfig(input_size=size, color=color, resize=resize, mean=mean, std=std)
        stub = import_stub(render_infer(tmp_path, {"input_size": list(size), "color": color, "resize": resize, "mean": mean, "std": std}))
        assert (stub.INPUT_SIZE, stub.COLOR, stub.RESIZE, stub.MEAN, stub.STD) == (list(size), color, resize, mean, std)
        for p in images:
            with Image.open(p) as img:
                img.load()
                ref = preprocess_image(img, cfg)
            got = stub.load_image(str(p), stub.INPUT_SIZE, stub.COLOR, stub.RESIZE, stub.MEAN, stub.STD)
            assert got.shape == ref.shape == (cfg.channels, *size) and got.dtype == np.float32
            worst = max(worst, float(np.abs(got - ref).max()))
    assert worst == 0.0


# ---------------------------------------------------------------- C++ preprocessing == Python
@pytest.fixture(scope="module")
def cpp_driver(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler on this host")
    exe = tmp_path_factory.mktemp("driver") / "preprocess_driver"
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-w", f"-I{CPP_TEMPLATES}", str(DRIVER), "-o", str(exe)], check=True)
    return exe


def two_pass_reference(path, size, color, resize, mean, std):
    """preprocess.py with Image.resize pinned to horizontal-then-vertical passes (what Pillow
    did up to 12; Pillow 13 may pick vertical first when both axes change)."""
    from edgebuild import preprocess as pp

    def resize_hv(img, wh, resample=None, *a, **k):
        w, h = wh
        out = img
        if out.width != w:
            out = orig(out, (w, out.height), resample)
        if out.height != h:
            out = orig(out, (w, h), resample)
        return out if out is not img else img.copy()

    orig = Image.Image.resize
    Image.Image.resize = resize_hv
    try:
        return pp.load_image(path, size, color, resize, mean, std)
    finally:
        Image.Image.resize = orig


def test_cpp_preprocessing_matches_python(tmp_path, images, cpp_driver):
    from edgebuild.preprocess import load_image

    worst_exact, worst_pillow = 0.0, 0.0
    for p, color, resize, size in itertools.product(images, COLORS, RESIZES, SIZES):
        mean, std = norm(color)
        out = tmp_path / "x.f32"
        subprocess.run([str(cpp_driver), str(size[0]), str(size[1]), color, resize, ",".join(map(repr, mean)),
                        ",".join(map(repr, std)), str(out), str(p)], check=True)
        ref = load_image(p, size, color, resize, mean, std)
        got = np.fromfile(out, dtype=np.float32).reshape(ref.shape)
        exact = two_pass_reference(p, size, color, resize, mean, std)
        worst_exact = max(worst_exact, float(np.abs(got - exact).max()))
        worst_pillow = max(worst_pillow, float(np.abs(got - ref).max()))
    print(f"C++ vs Python preprocessing: max abs diff {worst_exact} (two-pass Pillow), {worst_pillow} (this Pillow)")
    assert worst_exact == 0.0
    # at most one 8-bit level where this Pillow resamples vertically first
    assert worst_pillow <= 1.0 / 255.0 / 0.224 + 1e-6


# ---------------------------------------------------------------- escaping filters
def test_cpp_string_is_exact_and_inert(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    values = HOSTILE_LABELS + ["??=", "a\nb\tc", "\\x41\\u0041", "\x7f", "é\u2028"]
    src = ["#include <cstdio>\n#include <cstring>\nint main(){\n"]
    for v in values:
        src.append(f"  {{ const char s[] = {cpp_string(v)}; fwrite(s, 1, sizeof(s) - 1, stdout); putchar(0); }}\n")
    src.append("  return 0;\n}\n")
    (tmp_path / "t.cpp").write_text("".join(src), encoding="utf-8")
    subprocess.run([cxx, "-std=c++17", "-trigraphs", str(tmp_path / "t.cpp"), "-o", str(tmp_path / "t")], check=True)
    out = subprocess.run([str(tmp_path / "t")], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [v.encode("utf-8") for v in values]


def test_cpp_number_filters():
    assert cpp_int(3) == "3"
    assert float(cpp_float(0.485)) == 0.485 and cpp_float(1) == "1.0"
    for bad in (True, "3", 1.5, 2**40):
        with pytest.raises(ValueError):
            cpp_int(bad)
    for bad in (float("nan"), float("inf"), "0.5); system(\"x", None):
        with pytest.raises(ValueError):
            cpp_float(bad)


# ---------------------------------------------------------------- hostile names, end to end
HOSTILE_BACKBONE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, n)

    def forward(self, x):
        return self.fc(self.body(x))


def build():
    return Tiny()
'''


def make_hostile_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "backbone.py").write_text(HOSTILE_BACKBONE)
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for ci, label in enumerate(HOSTILE_LABELS):
            d = root / "data" / split / label
            d.mkdir(parents=True)
            for i in range(count):
                arr = np.full((16, 16, 3), (ci * 40) % 256, np.uint8) + rng.integers(0, 20, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(arr, "RGB").save(d / f"{i}.png")
    (root / "edgebuild.yaml").write_text(
        "name: hostile\n"
        "version: '1.0 \"*/ {{ x }} \\ é'\n"
        "seed: 0\n"
        "backbone: {source: 'python:backbone.py:build', classifier: fc}\n"
        "data: {train: data/train, val: data/val}\n"
        "preprocess: {input_size: [16, 16], color: rgb, resize: letterbox, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}\n"
        "transfer: {mode: scratch, epochs: 1, batch_size: 8, lr: 0.01}\n"
        "targets: [x86-onnxruntime-fp32, x86-openvino-fp32]\n",
        encoding="utf-8",
    )
    return root / "edgebuild.yaml"


def edgebuild(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "edgebuild", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def hostile_build(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("hostile")
    cfg = make_hostile_project(root / "project")
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(root / "cache"))
    outs = []
    for out, extra in ((root / "dist1", ["--force", "--reproducible"]), (root / "dist2", ["--reproducible"]), (root / "dist3", ["--force", "--reproducible"])):
        r = edgebuild("build", cfg, "-o", out, *extra, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(out)
    return outs


def test_hostile_labels_survive_python_stub_readme_manifest(hostile_build):
    dist = hostile_build[0]
    for target in ("x86-onnxruntime-fp32", "x86-openvino-fp32"):
        b = dist / f"hostile-{target}"
        assert (b / "labels.txt").read_text(encoding="utf-8").split("\n")[:-1] == HOSTILE_LABELS
        manifest = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["labels"] == HOSTILE_LABELS and manifest["schema"] == "edgebuild.bundle/1"
        assert manifest["version"] == '1.0 "*/ {{ x }} \\ é'
        readme = (b / "README.md").read_text(encoding="utf-8")
        for label in HOSTILE_LABELS:
            assert f"  {label}\n" in readme  # verbatim, in an indented code block
        r = subprocess.run([sys.executable, "infer.py", "--selftest"], cwd=b, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        img = next((b.parent.parent / "project" / "data" / "val" / HOSTILE_LABELS[0]).iterdir())
        r = subprocess.run([sys.executable, "infer.py", str(img), "--json", "--top-k", "99"], cwd=b, capture_output=True, text=True, encoding="utf-8")
        assert r.returncode == 0, r.stderr
        top = json.loads(r.stdout)[0]["top"]
        assert sorted(t["label"] for t in top) == sorted(HOSTILE_LABELS)
        assert all(HOSTILE_LABELS[t["index"]] == t["label"] for t in top)


def test_archives_are_deterministic(hostile_build):
    """Same inputs (second build served from the cache), different output folder: same bytes."""
    d1, d2, _ = hostile_build
    for target in ("x86-onnxruntime-fp32", "x86-openvino-fp32"):
        a1 = (d1 / f"hostile-{target}.tar.gz").read_bytes()
        a2 = (d2 / f"hostile-{target}.tar.gz").read_bytes()
        assert a1 == a2, f"{target}: archives differ between two --force builds"
        digest = (d1 / f"hostile-{target}.tar.gz.sha256").read_text().split()
        import hashlib

        assert digest == [hashlib.sha256(a1).hexdigest(), f"hostile-{target}.tar.gz"]
        with tarfile.open(d1 / f"hostile-{target}.tar.gz") as tar:
            names = tar.getnames()
            assert names[0] == f"hostile-{target}" and len(names) > 5
            assert names == sorted(names, key=lambda n: n.split("/"))
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and (m.isfile() or m.isdir()) for m in tar.getmembers())
        r = edgebuild("verify", d1 / f"hostile-{target}.tar.gz")
        assert r.returncode == 0, r.stdout + r.stderr


def test_archives_identical_across_force_builds(hostile_build):
    """--reproducible: two builds that ignore the cache give byte-identical archives."""
    d1, _, d3 = hostile_build
    for target in ("x86-onnxruntime-fp32", "x86-openvino-fp32"):
        assert (d1 / f"hostile-{target}.tar.gz").read_bytes() == (d3 / f"hostile-{target}.tar.gz").read_bytes()


def test_make_archive_is_deterministic(tmp_path):
    from edgebuild.stages.bundle import make_archive

    for i, where in enumerate(("a", "b")):
        src = tmp_path / where / "pkg-t"
        (src / "cpp").mkdir(parents=True)
        (src / "z.txt").write_text("z")
        (src / "cpp" / "main.cpp").write_text("int main(){}")
        (src / "a.bin").write_bytes(bytes(range(256)))
        if i:
            (src / "z.txt").touch()  # other mtime, same content
    d1 = make_archive(tmp_path / "a" / "pkg-t", tmp_path / "a" / "pkg-t.tar.gz", "pkg-t")
    d2 = make_archive(tmp_path / "b" / "pkg-t", tmp_path / "b" / "pkg-t.tar.gz", "pkg-t")
    assert d1 == d2 and (tmp_path / "a" / "pkg-t.tar.gz").read_bytes() == (tmp_path / "b" / "pkg-t.tar.gz").read_bytes()


def test_make_archive_entries_are_sorted(tmp_path):
    """Entries in path order whatever order the folder lists them in (files made shuffled)."""
    from edgebuild.stages.bundle import make_archive

    src = tmp_path / "pkg"
    names = [f"{c}{i}.txt" for c in "qwertyuiopasdfghjkl" for i in range(3)] + ["sub/z.bin", "sub/a.bin", "Sub2/m.txt"]
    for n in np.random.default_rng(0).permutation(names):
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_text(n)
    make_archive(src, tmp_path / "pkg.tar.gz", "pkg")
    with tarfile.open(tmp_path / "pkg.tar.gz") as tar:
        got = tar.getnames()
    expected = ["pkg"] + ["pkg/" + n for n in sorted(set(names) | {"sub", "Sub2"})]
    assert got == expected


@pytest.mark.slow
def test_hostile_labels_survive_cpp_stub(hostile_build, tmp_path):
    ov_cmake = Path(importlib.util.find_spec("openvino").submodule_search_locations[0]) / "cmake"
    if not shutil.which("cmake") or not ov_cmake.is_dir():
        pytest.skip("cmake or the OpenVINO CMake config is missing")
    b = hostile_build[0] / "hostile-x86-openvino-fp32"
    main_cpp = (b / "cpp" / "main.cpp").read_text(encoding="utf-8")
    assert "{{" not in main_cpp.split("kName")[1].split("\n")[0]  # the hostile version is a literal, not template syntax
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", b / "cpp", "-B", build, f"-DOpenVINO_DIR={ov_cmake}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["cmake", "--build", build, "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    img = next((hostile_build[0].parent / "project" / "data" / "val" / HOSTILE_LABELS[1]).iterdir())
    r = subprocess.run([build / "infer", img, "--json", "--top-k", "99", "--bundle", b], capture_output=True)
    assert r.returncode == 0, r.stderr
    cpp = json.loads(r.stdout.decode("utf-8"))[0]["top"]
    r = subprocess.run([sys.executable, "infer.py", str(img), "--json", "--top-k", "99"], cwd=b, capture_output=True)
    py = json.loads(r.stdout.decode("utf-8"))[0]["top"]
    assert [t["label"] for t in cpp] == [t["label"] for t in py]
    assert max(abs(a["score"] - b_["score"]) for a, b_ in zip(cpp, py)) < 1e-5
    r = subprocess.run([build / "infer", img, "--bundle", b], capture_output=True)
    assert r.stdout.decode("utf-8").startswith(f"{img}: {py[0]['label']} ")
