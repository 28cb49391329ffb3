"""Cache invalidation: each input of the transfer stage, changed alone, changes its key (so
every stage after it reruns), and an unchanged project keeps every key. Plans only: nothing is
trained here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgebuild.config import load_build_config
from edgebuild.pipeline import Build

from conftest import REPO, write_config


def keys(project: Path) -> dict:
    steps = Build(load_build_config(project / "edgebuild.yaml")).plan()
    return {(s.stage, s.target): s.key for s in steps}


def check_all_change(before: dict, after: dict) -> None:
    assert set(before) == set(after)
    same = [k for k in before if before[k] == after[k]]
    assert same == [], f"stages whose key did not change: {same}"


def test_unchanged_project_keeps_every_key(tiny_project):
    a = keys(tiny_project)
    (tiny_project / "unrelated.txt").write_text("x")
    os.utime(tiny_project / "backbone.safetensors")  # a newer mtime is no change
    assert keys(tiny_project) == a


def test_data_change_invalidates(tiny_project):
    before = keys(tiny_project)
    p = tiny_project / "data" / "val" / "b" / "img002.png"
    arr = np.asarray(Image.open(p)).copy()
    arr[0, 0] ^= 1  # one pixel, one bit
    Image.fromarray(arr).save(p)
    check_all_change(before, keys(tiny_project))


def test_weights_change_invalidates(tiny_project):
    import torch
    from safetensors.torch import load_file, save_file

    before = keys(tiny_project)
    w = tiny_project / "backbone.safetensors"
    sd = load_file(str(w))
    sd["fc.bias"] = sd["fc.bias"] + torch.tensor(1e-3)
    save_file(sd, str(w))  # same path, same shapes, other values
    check_all_change(before, keys(tiny_project))


def test_backbone_code_change_invalidates(tiny_project):
    before = keys(tiny_project)
    src = tiny_project / "backbone.py"
    src.write_text(src.read_text().replace("nn.ReLU(),\n", "nn.ReLU6(),\n", 1))
    check_all_change(before, keys(tiny_project))


def test_preprocess_settings_change_invalidates(tiny_project):
    before = keys(tiny_project)
    text = (tiny_project / "edgebuild.yaml").read_text()
    (tiny_project / "edgebuild.yaml").write_text(text.replace("  mean: [0.5]", "  mean: [0.4]"))
    check_all_change(before, keys(tiny_project))
    write_config(tiny_project)
    assert keys(tiny_project) == before


KEY_SCRIPT = """
import json, sys
from edgebuild.config import load_build_config
from edgebuild.pipeline import Build
import edgebuild
assert edgebuild.__file__.startswith(sys.argv[2]), edgebuild.__file__
steps = Build(load_build_config(sys.argv[1])).plan()
print(json.dumps({s.stage + '/' + s.target: s.key for s in steps}))
"""


def test_preprocess_code_change_invalidates(tiny_project, tmp_path):
    """A copy of the edgebuild package whose preprocess.py differs (one line added) gives other
    keys; an identical copy gives the same keys as this checkout."""
    import json

    def run_copy(where: Path, edit: bool) -> dict:
        shutil.copytree(REPO / "edgebuild", where / "edgebuild", ignore=shutil.ignore_patterns("__pycache__"))
        for folder in ("targets", "templates"):  # found beside the package in a source checkout
            (where / folder).symlink_to(REPO / folder)
        if edit:
            pp = where / "edgebuild" / "preprocess.py"
            pp.write_text(pp.read_text() + "\n_CHANGED = True\n")
        env = dict(os.environ, PYTHONPATH=str(where))
        r = subprocess.run([sys.executable, "-c", KEY_SCRIPT, str(tiny_project / "edgebuild.yaml"), str(where)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    here = {f"{s}/{t}": k for (s, t), k in keys(tiny_project).items()}
    assert run_copy(tmp_path / "same", edit=False) == here
    changed = run_copy(tmp_path / "edited", edit=True)
    assert [k for k in here if here[k] == changed[k]] == []
