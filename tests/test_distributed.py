"""Data-parallel training under torchrun: 2 CPU processes (gloo) against a single-process build.

The builds run as real subprocesses (``edgebuild build --nproc 2`` and ``torchrun ... -m
edgebuild build`` by hand), each with its own cache, output and TMPDIR folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_images, make_tiny_project, write_config
from edgebuild.distributed import epoch_shard, shard_bounds

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "edgebuild"]


# ------------------------------------------------------------------------------ pure logic (fast)
@pytest.mark.parametrize("n,w", [(10, 2), (11, 2), (7, 3), (1, 2)])
def test_epoch_shards_are_disjoint_equal_and_cover_the_permutation(n, w):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [epoch_shard(perm, r, w) for r in range(w)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = torch.cat(shards).tolist()
    assert set(seen) == set(range(n)) and len(seen) - n < w  # all covered, fewer than w padded
    if n % w == 0:
        assert len(set(seen)) == len(seen)  # disjoint


def test_shard_bounds_tile_the_rows():
    for n, w in [(10, 3), (2, 4), (0, 2)]:
        bounds = [shard_bounds(n, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


# ------------------------------------------------------------------------------ torchrun builds (slow)
def _project(root: Path, extra: str = "", mode: str = "finetune") -> Path:
    make_tiny_project(root)
    # more images than the default tiny project, so one image is not several accuracy points
    for split, count, seed in (("train", 40, 1), ("val", 20, 2)):
        make_images(root / "data" / split, {"a": count, "b": count, "c": count}, seed=seed)
    return write_config(root, extra=extra, mode=mode, epochs=4)


def _run(cmd: list[str], tmp: Path, cache: Path, env: dict | None = None, timeout: float = 150) -> tuple[int, str, float]:
    (tmp / "tmp").mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEBUILD_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}
    e.update(EDGEBUILD_CACHE_DIR=str(cache), TMPDIR=str(tmp / "tmp"), **(env or {}))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers: nothing outlives the test
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd[-6:])} did not finish within {timeout} s:\n{out[-3000:]}")
    return p.returncode, out, time.monotonic() - t0


def _layout(out: Path) -> list[str]:
    """The published names and everything under them (dist/NAME-TARGET links followed; the
    hidden generation folders, whose names differ per build, left out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, n).relative_to(out).as_posix() for n in dirnames + filenames if not n.startswith(".")]
    return sorted(found)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The same project built by one process and by two (edgebuild build --nproc 2)."""
    root = tmp_path_factory.mktemp("dist-project")
    cfg = _project(root)
    res = {"root": root, "cfg": cfg}
    for n in (1, 2):
        out, cache = root / f"dist{n}", root / f"cache{n}"
        cmd = [sys.executable, "-m", "edgebuild", "build", str(cfg), "-o", str(out)] + (["--nproc", "2"] if n == 2 else [])
        code, log, _ = _run(cmd, root, cache)
        assert code == 0, log
        res[n] = {"out": out, "cache": cache, "log": log, "report": json.loads((out / "report.json").read_text())}
    return res


@pytest.mark.slow
def test_two_processes_build_the_same_bundle(builds):
    one, two = builds[1], builds[2]
    assert _layout(one["out"]) == _layout(two["out"])
    t1, t2 = one["report"]["transfer"], two["report"]["transfer"]
    assert (t1["world_size"], t1["backend"]) == (1, None)
    assert (t2["world_size"], t2["backend"], t2["device"]) == (2, "gloo", "cpu")
    assert abs(t1["val_accuracy"] - t2["val_accuracy"]) <= 0.02, (t1["history"], t2["history"])
    m1 = json.loads(next(one["out"].glob("*/manifest.json")).read_text())["metrics"]["accuracy"]
    m2 = json.loads(next(two["out"].glob("*/manifest.json")).read_text())["metrics"]["accuracy"]
    assert abs(m1 - m2) <= 0.02
    # torchrun exits 0 only when every rank exited 0; rank 1 printed nothing of its own
    assert two["log"].count("plan for tiny") == 1
    assert not list((builds["root"] / "tmp").glob("edgebuild-rank*")), "the workers' private folders are left behind"
    entries = [p.name for p in (two["cache"] / "transfer").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # one entry, written by rank 0


@pytest.mark.slow
def test_by_hand_torchrun_cache_hit_and_gate_failure_status(builds):
    """torchrun by hand on the 2-process cache: rank 0's cache hit holds on every rank (nothing
    trains). A gate that fails after training: rank 0 exits 3, the worker exits with rank 0's
    status (or is stopped by torchrun's agent once rank 0 has exited); --nproc passes 3 through."""
    root, cfg, cache = builds["root"], builds["cfg"], builds[2]["cache"]
    code, log, _ = _run([*TORCHRUN, "build", str(cfg), "-o", str(root / "byhand")], root, cache)
    assert code == 0, log
    assert "running transfer" not in log and _layout(root / "byhand") == _layout(builds[2]["out"])
    gate_cfg = root / "gate.yaml"
    gate_cfg.write_text(cfg.read_text() + "budgets: {max_size_mb: 0.0001}\n")
    code, log, _ = _run([sys.executable, "-m", "edgebuild", "build", str(gate_cfg), "-o", str(root / "gate"), "--nproc", "2"], root, cache)
    assert code == 3, log
    assert "max_size_mb" in log and "running transfer" not in log
    assert "exitcode  : 3" in log and "exitcode  : 0" not in log and "exitcode  : 1 " not in log, log[-3000:]
    assert not any((root / "gate").glob("tiny-*"))


@pytest.mark.slow
def test_prune_recovery_with_distillation_on_two_processes(builds):
    """The transfer entry is a cache hit (rank 0 sends it to rank 1), the prune recovery trains
    data-parallel with the teacher on every rank."""
    root, cache = builds["root"], builds[2]["cache"]
    cfg = root / "prune.yaml"
    cfg.write_text(builds["cfg"].read_text() + "compress:\n  prune: {ratio: 0.5, recover_epochs: 2}\n  distill: {temperature: 4.0, alpha: 0.5}\n")
    code, log, _ = _run([sys.executable, "-m", "edgebuild", "build", str(cfg), "-o", str(root / "pruned"), "--nproc", "2"], root, cache)
    assert code == 0, log
    assert "running transfer" not in log and "running prune" in log
    report = json.loads((root / "pruned" / "report.json").read_text())
    (pruned,) = report["compression"].values()
    assert pruned["prune"]["params_ratio"] < 0.9 and pruned["distill"]
    assert (root / "pruned" / "tiny-x86-onnxruntime-fp32" / "manifest.json").is_file()


@pytest.mark.slow
def test_features_mode_shares_the_feature_pass(tmp_path):
    cfg = _project(tmp_path, mode="features")
    code, log, _ = _run([sys.executable, "-m", "edgebuild", "build", str(cfg), "-o", str(tmp_path / "out"), "--nproc", "2"],
                        tmp_path, tmp_path / "cache")
    assert code == 0, log
    t = json.loads((tmp_path / "out" / "report.json").read_text())["transfer"]
    assert t["mode"] == "features" and t["world_size"] == 2 and t["val_accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_failing_rank_stops_every_rank(tmp_path, fail_rank):
    """One rank raises an EdgebuildError in its first training step: all ranks end, non-zero,
    promptly (the peer sees the closed connection; torchrun's agent stops the rest), no bundle."""
    cfg = _project(tmp_path)
    code, log, seconds = _run([sys.executable, "-m", "edgebuild", "build", str(cfg), "-o", str(tmp_path / "out"), "--nproc", "2"],
                              tmp_path, tmp_path / "cache", env={"EDGEBUILD_TEST_FAIL_RANK": str(fail_rank), "EDGEBUILD_DIST_TIMEOUT": "600"},
                              timeout=180)
    assert seconds < 120, log
    assert code == 2, log  # the failing rank's EdgebuildError, passed through torchrun by --nproc
    assert f"injected failure on rank {fail_rank}" in log
    assert "ChildFailedError" in log  # torchrun's agent saw a worker fail and stopped the group
    assert not any((tmp_path / "out").glob("tiny-*"))
    assert not [p for p in (tmp_path / "cache").glob("transfer/*") if not p.name.startswith(".")]  # nothing cached


SAME_WEIGHTS = """
import hashlib, sys
import numpy as np, torch
from torch import nn
from edgebuild import distributed
from edgebuild.training import fit

distributed.init()
torch.manual_seed(0)
m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
rng = np.random.default_rng(0)
X = rng.standard_normal((64, 1, 8, 8)).astype(np.float32) * (1 + np.arange(64) % 5)[:, None, None, None].astype(np.float32)
y = np.arange(64) % 3
fit(m, m.parameters(), X, y, X[:8], y[:8], epochs=2, lr=0.05, batch_size=16, seed=0)
state = m.state_dict()
digest = hashlib.sha256(b"".join(state[k].detach().contiguous().numpy().tobytes() for k in sorted(state))).hexdigest()
with open(f"{sys.argv[1]}/rank{distributed.rank()}.txt", "w") as f:
    f.write(f"{distributed.world_size()} {digest} {float(state['1.running_var'].sum())}")
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_every_rank_ends_with_the_same_weights(tmp_path):
    """README: 'every rank ends with the same weights' (BatchNorm statistics included, though
    each rank normalised its own shard), checked on two real gloo processes."""
    script = tmp_path / "same_weights.py"
    script.write_text(SAME_WEIGHTS)
    out = tmp_path / "out"
    out.mkdir()
    code, log, _ = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script), str(out)],
                        tmp_path, tmp_path / "cache", timeout=120)
    assert code == 0, log
    r0, r1 = ((out / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0[0] == r1[0] == "2"
    assert r0[1] == r1[1], (r0, r1)
