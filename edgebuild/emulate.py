"""Validation of foreign-arch (aarch64) bundles under qemu-user emulation.

An arm64 Debian root is made once (debootstrap, then python3 and pip in it, then the bundle's
runtime wheels) and kept under the edgebuild cache; each bundle then runs its own ``infer.py``
there: ``--selftest`` and logits on the validation images. Emulation gives correct results, not
speed: latency is never measured under it. Chroot commands run in a private mount namespace
with /proc mounted (never /sys: ONNX Runtime segfaulted with it), so nothing stays mounted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .errors import EmulationError

SUITE = "bookworm"
ARCH = "aarch64"
DEB_ARCH = "arm64"
VALIDATION = f"emulated (qemu-user, {ARCH})"
BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates"]
VENV = "/opt/edgebuild-venv"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1",
              "ORT_DISABLE_TELEMETRY": "1"}
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def root_dir(cache_root: Path) -> Path:
    """Where the root lives: EDGEBUILD_EMULATION_ROOT, else under the edgebuild cache (shared by
    every build that uses this cache; tests point the variable at one shared root)."""
    env = os.environ.get("EDGEBUILD_EMULATION_ROOT")
    return Path(env) if env else Path(cache_root) / "emulation" / f"debian-{SUITE}-{DEB_ARCH}"


def binfmt_registered() -> bool:
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not entry.exists():
        # a binfmt_misc that is not mounted yet, or a handler that is not enabled yet
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    return entry.exists() and entry.read_text().splitlines()[:1] == ["enabled"]


def check_host() -> None:
    """Exit 2 with a hint when this host cannot run aarch64 binaries under qemu-user."""
    missing = [t for t, exe in (("qemu-user-static", "qemu-aarch64-static"), ("debootstrap", "debootstrap"), ("unshare", "unshare"))
               if not shutil.which(exe)]
    if missing:
        raise EmulationError(f"--emulate needs {' and '.join(missing)}, which this host does not have",
                             hint="sudo apt-get install qemu-user-static debootstrap (Debian/Ubuntu), then build again")
    if os.geteuid() != 0:
        raise EmulationError("--emulate needs root (debootstrap and chroot)", hint="run the build as root, e.g. in a container, or drop --emulate")
    if not binfmt_registered():
        raise EmulationError("binfmt_misc has no enabled qemu-aarch64 handler, so aarch64 programs cannot run here",
                             hint="sudo mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && sudo update-binfmts --enable qemu-aarch64")


def in_root(root: Path, argv: list[str]) -> list[str]:
    """The command that runs ``argv`` inside the root, in a private mount namespace with only /proc mounted."""
    script = 'mount -t proc proc "$1/proc" && r="$1" && shift && exec chroot "$r" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root), *argv]


def chroot(root: Path, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` inside the root (in_root) to the end."""
    return subprocess.run(in_root(root, argv), input=stdin, capture_output=True, timeout=timeout, env=CHROOT_ENV)


def _step(progress, what: str, cmd: list[str], *, total: int, root: Path | None = None, timeout: float = 3600) -> float:
    """Run one setup step with a progress bar over its output lines; returns its seconds."""
    import contextlib

    t0 = time.perf_counter()
    if root is not None:
        cmd = in_root(root, cmd)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=CHROOT_ENV, text=True, errors="replace")
    tail: list[str] = []
    with (progress.task(what, total) if progress else contextlib.nullcontext()) as task:
        n = 0
        for line in proc.stdout:
            n += 1
            tail = (tail + [line.rstrip()])[-15:]
            if task and n % 5 == 0:
                task.update(min(n, total - 1), line.strip()[:60])
        rc = proc.wait(timeout=timeout)
        if task:
            task.update(total, f"{time.perf_counter() - t0:.0f} s")
    if rc != 0:
        raise EmulationError(f"emulation root setup failed at '{what}' (exit {rc}): {' | '.join(tail[-3:])[:400]}",
                             hint="check the network to deb.debian.org and pypi.org, then build again (a half-made root is removed)")
    return time.perf_counter() - t0


def ensure_root(cache_root: Path, progress=None, log=print) -> tuple[Path, dict]:
    """The arm64 root with python3 and pip, made once; returns (root, setup record)."""
    check_host()
    root = root_dir(cache_root)
    ready = root / ".edgebuild-ready.json"
    if ready.is_file():
        return root, json.loads(ready.read_text())
    from .locks import FileLock

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.with_name(root.name + ".lock"), f"the emulation root {root}", log=log):  # one build makes it, others wait
        if ready.is_file():
            return root, json.loads(ready.read_text())
        return _make_root(root, ready, progress, log)


def _make_root(root: Path, ready: Path, progress, log) -> tuple[Path, dict]:
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"emulation: creating an arm64 Debian {SUITE} root under {root} (one-time cost, about 10 minutes and 600 MB; "
        "later builds reuse it)")
    rec: dict = {"suite": SUITE, "arch": DEB_ARCH, "qemu": _qemu_version(), "steps": {}}
    t0 = time.perf_counter()
    try:
        rec["steps"]["debootstrap"] = _step(progress, "emulation: debootstrap arm64", [
            "debootstrap", "--arch=" + DEB_ARCH, "--variant=minbase", SUITE, str(tmp), "http://deb.debian.org/debian"], total=400)
        ca = tmp / "usr/local/share/ca-certificates"
        ca.mkdir(parents=True, exist_ok=True)
        rec["steps"]["python3"] = _step(progress, "emulation: python3 and pip in the root", [
            "sh", "-c", "apt-get update -q && apt-get install -y -q --no-install-recommends " + " ".join(BASE_PACKAGES)], total=600, root=tmp)
        for f in sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []:
            shutil.copyfile(f, ca / f.name)  # a proxy's CA on this host: pip in the root needs it too
        rec["steps"]["venv"] = _step(progress, "emulation: CA certificates and venv", [
            "sh", "-c", f"update-ca-certificates && python3 -m venv {VENV} && {VENV}/bin/pip install -q --upgrade pip"], total=20, root=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rec["setup_seconds"] = time.perf_counter() - t0
    (tmp / ".edgebuild-ready.json").write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, root)
    log(f"emulation: root ready in {rec['setup_seconds'] / 60:.1f} min")
    return root, rec


def _qemu_version() -> str | None:
    try:
        out = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def install_requirements(root: Path, requirements: Path, progress=None) -> float:
    """pip install a bundle's requirements.txt into the root's venv (a no-op once there)."""
    dst = root / "tmp" / "edgebuild-requirements.txt"
    shutil.copyfile(requirements, dst)
    seconds = _step(progress, f"emulation: pip install {requirements.parent.name} requirements (arm64 wheels)",
                    [f"{VENV}/bin/pip", "install", "--prefer-binary", "-r", "/tmp/edgebuild-requirements.txt"], total=30, root=root)
    dst.unlink(missing_ok=True)
    return seconds


CHUNK_IMAGES = 64  # validation images per file handed to the root: host memory is bounded by this, not by len(X)
STALL_SECONDS = 3600  # the eval process is killed when no chunk finishes for this long

# One process in the root: the bundle's Model is made once (python's start under qemu is slow),
# then each chunk number read from stdin is run from work/x-I.npy into work/y-I.npy.
EVAL = """\
import os, platform, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import infer
model, work = infer.Model(), sys.argv[2]
for line in sys.stdin:
    i = line.strip()
    x = np.load(os.path.join(work, "x-%s.npy" % i))
    np.save(os.path.join(work, "y-%s.npy" % i), np.asarray(model(x), dtype=np.float32))
    print("edgebuild-done " + i, flush=True)
print("edgebuild-machine " + platform.machine(), flush=True)
"""


def stream_logits(command: list[str], X, work: Path, chunk: int = CHUNK_IMAGES, progress=None, what: str = "emulation: logits",
                  stall_seconds: float = STALL_SECONDS) -> tuple:
    """Logits of EVAL's process (started by ``command``, which sees ``work`` as the folder in its
    argv) on ``X``: an array or a store.ImageArray, sliced ``chunk`` images at a time and converted
    to float32 one chunk at a time. Chunk I+1 is written while the process runs chunk I, and each
    chunk's files are removed once its logits are read, so memory and disk hold about two chunks
    whatever len(X). Returns (logits, the process's platform.machine(), seconds)."""
    import contextlib
    import threading

    import numpy as np

    n = len(X)
    total = -(-n // chunk)
    out = np.zeros((0,), np.float32)
    machine, done, stalled = None, 0, []
    with open(work / "eval.stderr", "w+b") as err, (progress.task(what, total) if progress else contextlib.nullcontext()) as task:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=CHROOT_ENV)
        timer = None

        def feed(i: int) -> None:
            np.save(work / f"x-{i}.npy", np.ascontiguousarray(X[i * chunk : (i + 1) * chunk], dtype=np.float32))
            proc.stdin.write(f"{i}\n".encode())
            proc.stdin.flush()

        def watch() -> None:  # (re)start the stall clock
            nonlocal timer
            if timer:
                timer.cancel()
            timer = threading.Timer(stall_seconds, lambda: (stalled.append(1), proc.kill()))
            timer.daemon = True
            timer.start()

        try:
            with contextlib.suppress(BrokenPipeError):  # a process that died is reported from its exit status below
                if total:
                    feed(0)
                for i in range(total):
                    if i + 1 < total:
                        feed(i + 1)  # written while the process runs chunk i
                    else:
                        proc.stdin.close()
                    watch()
                    line = proc.stdout.readline()
                    while line and not line.startswith(b"edgebuild-done "):  # whatever else the Model prints
                        line = proc.stdout.readline()
                    if line.strip() != f"edgebuild-done {i}".encode():
                        break
                    y = np.load(work / f"y-{i}.npy")
                    if not done:
                        out = np.empty((n, *y.shape[1:]), np.float32)
                    out[i * chunk : i * chunk + len(y)] = y
                    (work / f"x-{i}.npy").unlink()
                    (work / f"y-{i}.npy").unlink()
                    done += 1
                    if task:
                        task.update(done, f"{min(n, done * chunk)}/{n} images")
                proc.stdin.close()  # EVAL's loop ends: it prints the machine and exits
            watch()
            for line in proc.stdout:
                if line.startswith(b"edgebuild-machine "):
                    machine = line.split(b" ", 1)[1].decode().strip()
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
    hint = "run 'edgebuild validate --emulate BUNDLE' to see the self-test's output"
    if stalled:
        raise EmulationError(f"the bundle's infer.py stalled under emulation: no chunk of {chunk} images finished in {stall_seconds:.0f} s", hint=hint)
    if rc != 0 or done < total:
        raise EmulationError(f"the bundle's infer.py failed under emulation: {(tail or [f'exit {rc}'])[0][:300]}", hint=hint)
    return out, machine, seconds


def run_bundle(bundle: Path, X, cache_root: Path, progress=None, log=print, chunk: int = CHUNK_IMAGES) -> dict:
    """Run a bundle's own infer.py in the arm64 root: ``--selftest``, then its Model on ``X``
    (one process, ``chunk`` images at a time: stream_logits)."""
    import tempfile

    root, setup = ensure_root(cache_root, progress, log)
    install = install_requirements(root, bundle / "requirements.txt", progress)
    work = Path(tempfile.mkdtemp(dir=root / "tmp", prefix="edgebuild-"))
    inside = f"/tmp/{work.name}"
    py = f"{VENV}/bin/python"
    try:
        shutil.copytree(bundle, work / "bundle")
        t0 = time.perf_counter()
        st = chroot(root, [py, f"{inside}/bundle/infer.py", "--selftest"], timeout=3600)
        selftest_s = time.perf_counter() - t0
        logits, machine, eval_s = stream_logits(in_root(root, [py, "-c", EVAL, f"{inside}/bundle", inside]), X, work, chunk, progress,
                                                f"emulation: {bundle.name} on {len(X)} images ({chunk} per chunk)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = (st.stdout + st.stderr).decode(errors="replace").strip()
    return {"selftest": "passed" if st.returncode == 0 else "FAILED", "selftest_output": out[-2000:], "logits": logits,
            "emulation": {"how": VALIDATION, "machine": machine, "qemu": setup.get("qemu"),
                          "root": f"debian {SUITE} {DEB_ARCH} (debootstrap minbase)", "root_setup_seconds": setup.get("setup_seconds"),
                          "requirements_install_seconds": round(install, 1), "selftest_seconds": round(selftest_s, 2),
                          "eval_seconds": round(eval_s, 2), "seconds_per_image": round(eval_s / max(len(X), 1), 4), "images": int(len(X)),
                          "chunk_images": chunk}}


def validate(profile, bundle: Path, Xval, yval, ref_logits, size_bytes: int, cache_root: Path, progress=None, log=print) -> dict:
    """Validation metrics of a foreign-arch bundle under emulation: accuracy and agreement, never
    latency (qemu-user shows correctness, not speed)."""
    import numpy as np

    from .metrics import accuracy, agreement, max_abs_diff

    log(f"  validating {profile.name} under emulation ({VALIDATION}); correct results, not speed")
    r = run_bundle(bundle, Xval, cache_root, progress, log)
    logits = r["logits"]
    return {
        "status": "emulated",
        "validated": VALIDATION,
        "reason": f"target arch {profile.arch}: validated {VALIDATION}; latency not measured (emulated)",
        "accuracy": accuracy(logits, yval),
        "reference_accuracy": accuracy(ref_logits, yval),
        "agreement": agreement(logits, ref_logits),
        "max_abs_diff": max_abs_diff(logits, ref_logits),
        "reference_scale": float(np.max(np.abs(ref_logits))) if ref_logits.size else 0.0,
        "latency": "not measured (emulated)",
        "selftest": r["selftest"],
        "selftest_output": r["selftest_output"],
        "size_bytes": size_bytes,
        "samples": int(len(yval)),
        "settings": {"runtime": profile.runtime, "threads": profile.threads or "default", "emulated": True},
        "emulation": r["emulation"],
    }
