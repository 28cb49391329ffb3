"""Ctrl-C and kill -9 mid-build leave the cache and the previous dist/ intact; the next build
resumes from the last completed stage and succeeds."""

import hashlib
import json
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
    """What a user sees in dist/: every published name, links followed, with its content's hash
    (hidden entries, a killed build's staging folder and unpublished generations, are not part
    of it; the next build sweeps them, checked below)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
            out[f.relative_to(folder).as_posix() if f != p else p.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def published_whole(dist: Path) -> str:
    """dist/ shows one generation, whole: every published name resolves into the same one, each
    bundle folder and its archive verify and hold the same manifest, and the report lists
    exactly those bundles. Returns the generation's name."""
    import json
    import tarfile

    from edgebuild.verify import verify_bundle

    names = [p for p in dist.iterdir() if not p.name.startswith(".") and not p.name.startswith("failed-report")]
    gens = {Path(os.path.realpath(p)).relative_to(dist.resolve()).parts[:2] for p in names}
    assert len(gens) == 1 and next(iter(gens))[0] == ".generations", gens
    report = json.loads((dist / "report.json").read_text())
    bundles = sorted(p.name for p in names if p.is_dir())
    assert set(t["bundle"] for t in report["targets"].values()) <= set(bundles)  # and other targets' bundles, carried
    for b in bundles:
        folder = verify_bundle(dist / b)["manifest"]
        archive = verify_bundle(dist / f"{b}.tar.gz")["manifest"]
        assert folder == archive
        with tarfile.open(dist / f"{b}.tar.gz") as tar:
            assert json.loads(tar.extractfile(f"{b}/manifest.json").read()) == json.loads((dist / b / "manifest.json").read_text())
    return next(iter(gens))[1]


def sigint_as_a_terminal_gives_it() -> None:
    """In the build's process before it starts: a suite started in the background (``cmd &``,
    nohup, some CI runners) has SIGINT ignored, children inherit that, and Python then never
    raises KeyboardInterrupt; a Ctrl-C from a terminal is what these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def build_proc(project: Path, cache: Path, out: Path | None = None):
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "edgebuild", "build", str(project / "edgebuild.yaml"), "-t", "x86-onnxruntime-fp32",
                             "-t", "x86-openvino-int8", "--reproducible", *(["-o", str(out)] if out else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=project,
                            preexec_fn=sigint_as_a_terminal_gives_it)


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


def started(log: str) -> list[tuple[str, str]]:
    """(stage, target) of every 'running ...' line, in order."""
    out = []
    for line in log.splitlines():
        if line.startswith("running "):
            words = line[len("running "):].split(" ", 1)
            out.append((words[0], words[1].strip("[]") if len(words) > 1 and not words[1].startswith("[align") else ""))
    return out


def entries(cache: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in cache.glob("*/*") if p.is_dir() and not p.name.startswith(".")}


def cache_is_intact(cache: Path) -> None:
    c = Cache(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt entry would warn
        for e in c.entries():
            if e["stage"] in ("data", "emulation", "torch_extensions"):
                continue  # the image store and tool folders: not checksummed stage outputs
            assert c.get(e["stage"], e["key"]) is not None, e


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    """A tiny project built once (2 epochs); each test interrupts a 3-epoch rebuild of a copy of
    it. The same 3-epoch build, uninterrupted from a cold cache, is the reference every resumed
    build must equal byte for byte (--reproducible)."""
    import shutil

    import conftest

    root = tmp_path_factory.mktemp("interrupt-src")
    project = conftest.make_tiny_project(root / "project")
    cache = root / "cache"
    first = build_proc(project, cache)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    # the reference is built where every test's project will be: the ONNX files name the
    # backbone's module after its path (edgebuild_user_<hash of the path>)
    work = root / "work" / "project"
    shutil.copytree(project, work, ignore=shutil.ignore_patterns("dist"))
    write_config(work, epochs=3)
    ref = build_proc(work, root / "ref-cache", out=root / "ref-dist")
    log, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, log
    shutil.rmtree(work)
    return project, cache, tree_digest(root / "ref-dist"), started(log), work


# (signal, the line it follows, seconds after that line): at a stage's start and inside it
# (mid-training, mid-benchmark, inside NNCF), and at the last stage, where bundles are published
CASES = [(signal.SIGINT, "running transfer", 0), (signal.SIGKILL, "running transfer", 0.3),
         (signal.SIGINT, "running export [x86-onnxruntime-fp32]", 0), (signal.SIGKILL, "running validate [x86-onnxruntime-fp32]", 0.2),
         (signal.SIGKILL, "running export [x86-openvino-int8]", 0), (signal.SIGINT, "running quantize", 0),
         (signal.SIGKILL, "running quantize", 1.0), (signal.SIGKILL, "running validate [x86-openvino-int8]", 0),
         (signal.SIGINT, "running validate [x86-openvino-int8]", 0.3)]


@pytest.mark.parametrize("sig,marker,delay", CASES, ids=[f"{s.name}-{m.split()[1]}{'-' + m.split()[2].strip('[]').split('-')[1] if len(m.split()) > 2 else ''}+{d}"
                                                         for s, m, d in CASES])
def test_interrupt_keeps_cache_and_dist(built_once, tmp_path, sig, marker, delay):
    import shutil

    project, cache = built_once[4], tmp_path / "cache"
    shutil.rmtree(project, ignore_errors=True)  # one path for every case (see built_once)
    shutil.copytree(built_once[0], project, symlinks=True)  # dist/'s published names are links into a generation
    shutil.copytree(built_once[1], cache)
    reference, all_stages = built_once[2], built_once[3]
    dist = project / "dist"
    before = tree_digest(dist)
    entries_before = entries(cache)
    # change the training so everything reruns, then interrupt at the marker
    write_config(project, epochs=3)
    proc = build_proc(project, cache)
    log = wait_for(proc, marker)
    if delay:
        time.sleep(delay)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    log += rest
    if sig == signal.SIGINT:
        assert proc.returncode == 130, rest
        assert "Traceback" not in rest
        assert "interrupted: the cache and the previous dist/ are intact" in rest
        assert not [p for p in dist.iterdir() if p.name.startswith(".staging")]
    else:
        assert proc.returncode == -9
    after = tree_digest(dist)
    published_whole(dist)
    if after != before:
        # the signal came after the new build was switched in (Ctrl-C waits for publishing to
        # end): dist/ is then the whole new build, the one an uninterrupted build gives
        assert "validate [x86-openvino-int8]" in marker and sig == signal.SIGINT, "the previous dist/ changed"
        assert {k: v for k, v in after.items() if not k.startswith("report.")} == \
            {k: v for k, v in reference.items() if not k.startswith("report.")}
    cache_is_intact(cache)
    # the cache holds exactly the stages that finished before the signal (the one it hit may
    # have finished too), each whole
    ran = started(log)
    finished, hit = ran[:-1], ran[-1]
    new_entries = sorted(e.split("/")[0] for e in entries(cache) - entries_before)
    assert sorted(s for s, _ in finished) == new_entries or sorted(s for s, _ in ran) == new_entries, (ran, new_entries)
    # the next build succeeds, reuses what finished, and gives the uninterrupted build's bytes
    again = build_proc(project, cache)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    plan = {(s["stage"], s["target"]): s["cached"] for s in json.loads((dist / "report.json").read_text())["plan"]}
    assert all(plan[s] for s in finished), (finished, plan)
    assert [s for s in started(out)] == [s for s in all_stages if not plan[s]]
    assert not [s for s in all_stages if s not in finished and s != hit and plan[s]]
    assert {k: v for k, v in tree_digest(dist).items() if not k.startswith("report.")} == \
        {k: v for k, v in reference.items() if not k.startswith("report.")}
    assert sorted(p.name for p in dist.iterdir() if p.name.startswith(".")) == [".current", ".generations", ".lock"]
    assert [p.name for p in (dist / ".generations").iterdir()] == [published_whole(dist)]  # no debris
    assert not list(cache.rglob(".tmp-*"))
    cache_is_intact(cache)


PUBLISH_STEPS = ["archive", "bundle", "carried", "report", "links", "flipped", "swept"]


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_kill_9_at_each_publishing_step_leaves_one_whole_build(built_once, tmp_path, step):
    """kill -9 while dist/ is being published (EDGEBUILD_TEST_PUBLISH_DELAY holds each step):
    dist/ is the complete old build before the switch and the complete new one after it;
    bundles, archives and report always agree, and the next build cleans up."""
    import shutil

    project, cache = tmp_path / "project", tmp_path / "cache"
    shutil.copytree(built_once[0], project, symlinks=True)
    shutil.copytree(built_once[1], cache)
    dist = project / "dist"
    before = tree_digest(dist)
    old_gen = published_whole(dist)
    write_config(project, epochs=3)  # a different model: every bundle changes
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", EDGEBUILD_TEST_PUBLISH_DELAY="5")
    # one target rebuilt (fast); the other target's bundle is carried into the new generation
    proc = subprocess.Popen([sys.executable, "-m", "edgebuild", "build", str(project / "edgebuild.yaml"), "-t", "x86-onnxruntime-fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=project)
    wait_for(proc, f"publish step: {step}")
    proc.kill()
    proc.communicate(timeout=60)
    gen = published_whole(dist)
    if PUBLISH_STEPS.index(step) < PUBLISH_STEPS.index("flipped"):
        assert gen == old_gen and tree_digest(dist) == before
    else:
        assert gen != old_gen and tree_digest(dist) != before
    again = subprocess.run([sys.executable, "-m", "edgebuild", "build", str(project / "edgebuild.yaml"), "-t", "x86-onnxruntime-fp32"],
                           capture_output=True, text=True, env=dict(env, EDGEBUILD_TEST_PUBLISH_DELAY=""), cwd=project)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (dist / ".generations").iterdir()] == [published_whole(dist)]
    assert not [p for p in dist.iterdir() if ".link-" in p.name or p.name.startswith((".staging", ".current.tmp"))]
    assert {"tiny-x86-onnxruntime-fp32", "tiny-x86-openvino-int8"} <= {p.name for p in dist.iterdir()}  # the untouched target kept
