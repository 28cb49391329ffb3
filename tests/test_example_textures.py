"""The textures example's generator: deterministic RGB 128x128 images, folders and few-shot copies.

(Building the example takes minutes: make example-textures; the accuracies are in BENCHMARKS.md.)
"""

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("textures_make_example", REPO / "examples" / "textures" / "make_example.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its worker processes find the functions by module name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_images_are_deterministic_rgb_and_differ_by_class(gen):
    assert not set(gen.TASK_A) & set(gen.TASK_B)  # pretraining and transfer classes are disjoint
    imgs = {}
    for ci, name in enumerate(gen.TASK_A + gen.TASK_B):
        a = gen.draw(name, gen.image_rng("B", "val", ci, 0))
        b = gen.draw(name, gen.image_rng("B", "val", ci, 0))
        assert a.shape == (128, 128, 3) and a.dtype == np.uint8 and np.array_equal(a, b), name
        imgs[name] = a
    assert not np.array_equal(gen.draw("plaid", gen.image_rng("B", "val", 4, 1)), imgs["plaid"])
    assert len({im.tobytes() for im in imgs.values()}) == len(imgs)


def test_folders_fewshot_and_stamp(gen, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "SPLITS", {"train": 3, "val": 1, "test": 1})
    monkeypatch.setattr(gen, "FEWSHOT", 2)
    root = tmp_path / "data"
    gen.write_folders(root)
    for split, n in (("train", 3), ("val", 1), ("test", 1), ("train-fewshot", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(gen.TASK_B), split
        assert all(len(list((root / split / c).glob("*.png"))) == n for c in gen.TASK_B), split
    first = root / "train" / "spiral" / "0000.png"
    assert (root / "train-fewshot" / "spiral" / "0000.png").read_bytes() == first.read_bytes()
    with Image.open(first) as im:
        assert im.mode == "RGB" and im.size == (128, 128)
    assert json.loads((root / ".generated").read_text())["images"] == 6 * 5
    mtime = first.stat().st_mtime_ns
    gen.write_folders(root)  # up to date: nothing rewritten
    assert first.stat().st_mtime_ns == mtime
