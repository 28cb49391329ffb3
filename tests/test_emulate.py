"""Emulated validation streams: emulate.stream_logits runs EVAL (the script the arm64 root runs)
in one process, chunk by chunk. Here the process is the host's python on a host bundle of a tiny
model (no qemu): logits in order and equal to one shot, never more than a chunk in memory or in
one file, at most two chunks on disk, progress per chunk, and the failure and stall errors."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import export_for_quantize
from test_bundle import render_infer

from edgebuild import emulate
from edgebuild.errors import EmulationError

# EVAL with np.load spied on: each chunk file it reads, its rows and the chunk files then on disk
SPY = """\
import os, sys, numpy as np
_load = np.load
def _spy(path, *a, **k):
    arr = _load(path, *a, **k)
    work = os.path.dirname(str(path))
    on_disk = len([f for f in os.listdir(work) if f.startswith("x-")])
    with open(os.path.join(work, "..", "spy.log"), "a") as f:
        f.write("%s %d %d\\n" % (os.path.basename(str(path)), len(arr), on_disk))
    return arr
np.load = _spy
"""


class Images:
    """A split as validation gets it (store.ImageArray-like): slices only, never the whole."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.slices: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx):
        out = self.x[idx]
        self.slices.append(len(out))
        return out

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole split was materialised")


class Recorder:
    def __init__(self):
        self.tasks: list[tuple[str, int]] = []
        self.updates: list[int] = []

    def task(self, what, total):
        import contextlib

        self.tasks.append((what, total))
        return contextlib.nullcontext(self)

    def update(self, n, info=None):
        self.updates.append(n)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """model.onnx (dynamic batch) of a tiny CNN and the infer.py a bundle ships with it."""
    import torch
    from torch import nn

    tmp = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    _, edir, _ = export_for_quantize(tmp, model, target="x86-onnxruntime-fp32")
    shutil.copyfile(render_infer(tmp, {"input_size": [8, 8], "color": "grayscale", "resize": "stretch", "mean": [0.5], "std": [0.25]}),
                    edir / "infer.py")
    return edir


def host_model(bundle: Path):
    spec = importlib.util.spec_from_file_location("bundle_infer", bundle / "infer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Model()


def stream(bundle: Path, tmp: Path, X, chunk: int, script: str = emulate.EVAL, **kw):
    work = tmp / "work"
    work.mkdir(parents=True)
    return emulate.stream_logits([sys.executable, "-c", script, str(bundle), str(work)], X, work, chunk, **kw), work


def test_chunked_logits_equal_one_shot_in_order(bundle, tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 1, 8, 8)).astype(np.float32)
    want = host_model(bundle)(x)
    images, progress = Images(x), Recorder()
    (logits, machine, seconds), work = stream(bundle, tmp_path / "chunked", images, 4, SPY + emulate.EVAL, progress=progress)
    (single, _, _), _ = stream(bundle, tmp_path / "single", x, 64)
    assert logits.shape == (10, 3) and logits.dtype == np.float32 and machine == platform.machine() and seconds > 0
    np.testing.assert_allclose(logits, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)  # row i is image i's
    assert len({r.tobytes() for r in want}) == 10  # distinct rows: a reordering would show
    # the host read the split one chunk at a time; the process loaded 4 + 4 + 2 rows, in order,
    # with at most two chunk files on disk; nothing is left behind
    assert images.slices == [4, 4, 2]
    spy = [line.split() for line in (tmp_path / "chunked" / "spy.log").read_text().splitlines()]
    assert [(f, int(n)) for f, n, _ in spy] == [("x-0.npy", 4), ("x-1.npy", 4), ("x-2.npy", 2)]
    assert max(int(d) for _, _, d in spy) <= 2
    assert sorted(p.name for p in work.iterdir()) == ["eval.stderr"]
    assert progress.tasks == [("emulation: logits", 3)] and progress.updates == [1, 2, 3]


def test_failing_model_is_emulation_error_with_its_last_stderr_line(bundle, tmp_path):
    x = np.zeros((5, 2, 8, 8), np.float32)  # two channels: the model takes one
    with pytest.raises(EmulationError) as e:
        stream(bundle, tmp_path, x, 2)
    stderr = (tmp_path / "work" / "eval.stderr").read_text()
    assert "INVALID_ARGUMENT" in stderr.upper()  # onnxruntime refused the chunk
    assert e.value.message == "the bundle's infer.py failed under emulation: " + stderr.strip().splitlines()[-1][:300]
    assert "edgebuild validate --emulate" in e.value.hint


def test_stalled_process_is_killed_and_reported(bundle, tmp_path):
    with pytest.raises(EmulationError) as e:
        stream(bundle, tmp_path, np.zeros((3, 1, 8, 8), np.float32), 2, "import time; time.sleep(120)", stall_seconds=1)
    assert "stalled under emulation: no chunk of 2 images finished in 1 s" in e.value.message
