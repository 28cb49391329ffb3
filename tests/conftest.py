"""Shared fixtures: tiny image datasets, tiny backbones, an isolated cache, a CLI runner."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "digits"

TINY_BACKBONE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, cin=1, n=4):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(16, n)

        def forward(self, x):
            return self.fc(self.body(x))

    def build():
        return Tiny(1, 4)

    def build_rgb():
        return Tiny(3, 4)
    """
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache unless it asks for the shared one."""
    monkeypatch.setenv("EDGEBUILD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def make_images(root: Path, classes: dict[str, int], size=(16, 16), mode="L", seed=0) -> Path:
    """Class folders of synthetic images whose class is learnable (brightness and stripes per class)."""
    rng = np.random.default_rng(seed)
    for ci, (name, count) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = rng.integers(0, 50, size=(size[1], size[0])).astype(np.uint8)
            arr += np.uint8((ci * 67) % 200)  # the class sets the brightness ...
            if ci % 2:
                arr[::2, :] = 255 - arr[::2, :]  # ... and odd classes have stripes
            img = Image.fromarray(arr, "L")
            if mode != "L":
                img = img.convert(mode)
            img.save(d / f"img{i:03d}.png")
    return root


@pytest.fixture
def tiny_project(tmp_path):
    """A complete small project: backbone file, weights, train/val folders, build file."""
    return make_tiny_project(tmp_path)


def make_tiny_project(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "backbone.py").write_text(TINY_BACKBONE)
    classes = {"a": 12, "b": 12, "c": 12}
    make_images(tmp_path / "data" / "train", classes, seed=1)
    make_images(tmp_path / "data" / "val", {k: 5 for k in classes}, seed=2)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_backbone_for_weights", tmp_path / "backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    save_file(mod.build().state_dict(), str(tmp_path / "backbone.safetensors"))
    write_config(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    """One tiny project per test module, copied for each case by ``project`` (making it trains
    nothing but writes weights)."""
    return make_tiny_project(tmp_path_factory.mktemp("base-project") / "base")


@pytest.fixture
def project(base_project, tmp_path) -> Path:
    """A private copy of the module's ``base_project`` that a test may change."""
    dst = tmp_path / "project"
    shutil.copytree(base_project, dst, symlinks=True)
    return dst


def export_for_quantize(tmp_path: Path, model, target: str = "x86-onnxruntime-int8", example=None, **update):
    """``model`` exported for the built-in profile ``target`` (changed by ``update``) into
    tmp_path/export, and an empty tmp_path/quant: (profile, export folder, quantize folder),
    what the quantize stage takes."""
    import torch

    from edgebuild.profiles import ProfileRegistry
    from edgebuild.stages import export as export_stage

    prof = ProfileRegistry([]).get(target).model_copy(update=update)
    edir, out = tmp_path / "export", tmp_path / "quant"
    edir.mkdir()
    out.mkdir()
    export_stage.run(model, torch.zeros(1, 1, 8, 8) if example is None else example, prof, edir)
    return prof, edir, out


def write_config(root: Path, extra: str = "", targets: str = "[x86-onnxruntime-fp32]", mode: str = "finetune", epochs: int = 2) -> Path:
    text = textwrap.dedent(
        f"""
        name: tiny
        version: 0.0.1
        seed: 0
        backbone:
          source: python:backbone.py:build
          weights: backbone.safetensors
          classifier: fc
        data:
          train: data/train
          val: data/val
        preprocess:
          input_size: [16, 16]
          color: grayscale
          resize: stretch
          mean: [0.5]
          std: [0.5]
        transfer:
          mode: {mode}
          epochs: {epochs}
          batch_size: 16
          lr: 0.05
        targets: {targets}
        """
    ) + extra
    p = root / "edgebuild.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from edgebuild.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(list(map(str, args)))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def example_build(tmp_path_factory):
    """The shipped example built once for the host targets plus one absent target."""
    from edgebuild.cli import main

    out = tmp_path_factory.mktemp("example-dist")
    cache = tmp_path_factory.mktemp("example-cache")
    old = os.environ.get("EDGEBUILD_CACHE_DIR")
    os.environ["EDGEBUILD_CACHE_DIR"] = str(cache)
    try:
        code = main(["build", str(EXAMPLE / "edgebuild.yaml"), "-o", str(out),
                     "-t", "x86-onnxruntime-fp32", "-t", "x86-onnxruntime-int8", "-t", "x86-openvino-int8",
                     "-t", "rpi-aarch64-onnxruntime-int8"])
    finally:
        if old is None:
            os.environ.pop("EDGEBUILD_CACHE_DIR", None)
        else:
            os.environ["EDGEBUILD_CACHE_DIR"] = old
    assert code == 0
    return {"out": out, "cache": cache}


# ----------------------------------------------------------------------------------------------
# The providers environment (make test-providers): torchvision and timm beside the registry's torch
# ----------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--providers", action="store_true",
                     help="run only the tests marked 'providers' (they need torchvision and timm: make test-providers)")


def pytest_collection_modifyitems(config, items):
    """Tests marked 'providers' run only with --providers, and then only they do: the main suite
    and the providers environment never run the same slow builds twice."""
    want = config.getoption("--providers")
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("providers") is not None) == want else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # emulated tests (qemu-user, an arm64 root made once in ~10 min) run only when asked
    if os.environ.get("EDGEBUILD_TEST_EMULATED") != "1":
        skip = pytest.mark.skip(reason="emulated: set EDGEBUILD_TEST_EMULATED=1 (make test-emulated)")
        for item in items:
            if "emulated" in item.keywords:
                item.add_marker(skip)
