"""Ctrl-C and kill -9 mid-build leave the cache and the previous dist/ intact; the next build
resumes from the last completed stage and succeeds."""

import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from edgebuild.cache import Cache

from conftest import write_config

pytestmark = pytest.mark.slow


def tree_digest(folder: Path) -> dict:
    """Every file of dist/ but a killed build's staging folder (kill -9 cannot clean up; the
    next build sweeps it, checked below)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".staging-")}


def build_proc(project: Path, cache: Path):
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "edgebuild", "build", str(project / "edgebuild.yaml"), "-t", "x86-onnxruntime-fp32", "-t", "x86-openvino-int8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=project)


def wait_for(proc, marker: str, timeout=300) -> str:
    seen = []
    t_end = time.time() + timeout
    while time.time() < t_end:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"never saw {marker!r}: {''.join(seen)[-2000:]}")


def cache_is_intact(cache: Path) -> None:
    c = Cache(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt entry would warn
        for e in c.entries():
            assert c.get(e["stage"], e["key"]) is not None, e


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    """A tiny project built once; each test interrupts a rebuild of a copy of it."""
    import conftest

    root = tmp_path_factory.mktemp("interrupt-src")
    project = conftest.make_tiny_project(root / "project")
    cache = root / "cache"
    first = build_proc(project, cache)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    return project, cache


CASES = [(signal.SIGINT, "running transfer"), (signal.SIGKILL, "running export [x86-openvino-int8]"),
         (signal.SIGINT, "running quantize"), (signal.SIGKILL, "running validate [x86-openvino-int8]")]


@pytest.mark.parametrize("sig,marker", CASES, ids=[f"{s.name}-{m.split()[1]}" for s, m in CASES])
def test_interrupt_keeps_cache_and_dist(built_once, tmp_path, sig, marker):
    import shutil

    project, cache = tmp_path / "project", tmp_path / "cache"
    shutil.copytree(built_once[0], project)
    shutil.copytree(built_once[1], cache)
    dist = project / "dist"
    before = tree_digest(dist)
    # change the training so everything reruns, then interrupt at the marker
    write_config(project, epochs=3)
    proc = build_proc(project, cache)
    wait_for(proc, marker)
    proc.send_signal(sig)  # at once: the stage has just started
    rest, _ = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, rest
        assert "Traceback" not in rest
        assert not [p for p in dist.iterdir() if p.name.startswith(".staging")]
    else:
        assert proc.returncode == -9
    after = tree_digest(dist)
    if "validate" in marker and after != before:
        # killed while moving finished bundles into place: each bundle is then either the old
        # one or the whole new one, never a mix (folders are swapped by one rename)
        from edgebuild.verify import verify_bundle

        for b in (p for p in dist.iterdir() if p.is_dir() and not p.name.startswith(".")):
            verify_bundle(b)
            files = {k: v for k, v in after.items() if k.startswith(b.name + "/")}
            old = {k: v for k, v in before.items() if k.startswith(b.name + "/")}
            assert files == old or set(files) == set(old)
    else:
        assert after == before, "the previous dist/ changed"
    cache_is_intact(cache)
    # the next build succeeds, resumes from what was completed and leaves no debris
    again = build_proc(project, cache)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    if "transfer" not in marker:
        assert "cached" in out  # stages completed before the interrupt are reused
    assert not [p for p in dist.iterdir() if p.name.startswith(".")]
    assert not list(cache.rglob(".tmp-*"))
    cache_is_intact(cache)
