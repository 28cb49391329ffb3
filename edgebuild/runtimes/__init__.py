"""One adapter per runtime: what a runtime exports, how it quantizes, loads, runs and benchmarks
an artifact, what a host needs to run it, and what its bundle's ``infer.py`` uses.

The stages (export, quantize, validate, bundle) call :func:`adapter` and never branch on the
runtime themselves; a new runtime is a module here plus profiles and a template block in
``templates/runtimes/``. Optional runtimes name the pip extra that installs them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..config import TargetProfile


class Runner:
    """Common behaviour: batching to the artifact's static batch, and latency measurement."""

    static_batch: int | None = None
    settings: dict = {}

    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Outputs for ``x`` (an array or a store.ImageArray), one batch in memory at a time."""
        step = self.static_batch or batch_size
        outs = []
        for b in range(0, len(x), step):
            chunk = np.ascontiguousarray(x[b : b + step], dtype=np.float32)
            n = len(chunk)
            if self.static_batch and n < self.static_batch:
                chunk = np.concatenate([chunk, np.zeros((self.static_batch - n,) + chunk.shape[1:], np.float32)])
            outs.append(np.asarray(self._run(chunk))[:n])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def benchmark(self, sample: np.ndarray, warmup: int = 10, min_iters: int = 50, max_seconds: float = 5.0, progress=None) -> dict:
        """Latency of one batch (the artifact's static batch, else 1) after warm-up."""
        n = self.static_batch or 1
        x = np.ascontiguousarray(np.repeat(sample[:1], n, axis=0), dtype=np.float32)
        import contextlib

        for _ in range(warmup):
            self._run(x)
        times = []
        t_end = time.perf_counter() + max_seconds
        label = f"benchmark {self.settings.get('runtime', '')} ({self.settings.get('threads', 'default')} threads)"
        with (progress.task(label, 10 * min_iters) if progress else contextlib.nullcontext()) as task:
            while len(times) < min_iters or (time.perf_counter() < t_end and len(times) < 10 * min_iters):
                t0 = time.perf_counter()
                self._run(x)
                times.append((time.perf_counter() - t0) * 1000.0)
                if task and len(times) % 25 == 0:
                    task.update(len(times), f"p50 {np.percentile(times, 50):.3f} ms")
                if len(times) >= min_iters and time.perf_counter() > t_end:
                    break
            if task:
                task.update(len(times), f"p50 {np.percentile(times, 50):.3f} ms over {len(times)} runs")
        arr = np.asarray(times)
        return {
            "batch": n,
            "iterations": len(times),
            "warmup": warmup,
            "p50_ms": float(np.percentile(arr, 50)),
            "p90_ms": float(np.percentile(arr, 90)),
            "mean_ms": float(arr.mean()),
            "throughput_ips": float(n * 1000.0 / arr.mean()),
        }


class Adapter:
    """The interface every runtime implements (defaults are the ONNX-based behaviour)."""

    name = ""
    extra: str | None = None  # pip extra that installs the runtime (None: a core dependency)
    modules: tuple[str, ...] = ()  # what must import for this runtime to build and run
    packages: tuple[str, ...] = ()  # distributions whose versions key the cache and the manifest
    package = ""  # what a bundle's requirements.txt pins
    accuracy_control = False  # quantize() accepts an accuracy-control callback (NNCF)
    qat = False  # edgebuild.qat can export a quantization-aware trained model to this runtime
    emulatable = False  # its bundle runs on aarch64 Linux (wheels exist), so --emulate can validate it

    def missing(self) -> str | None:
        """Why this runtime cannot be used at all here (its extra is not installed), or None.
        Found without importing (the converters are slow and noisy to import)."""
        import importlib.util

        for mod in self.modules:
            top = mod.split(".")[0]
            try:
                found = sys.modules.get(top, True) is not None and importlib.util.find_spec(top) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                if self.extra:
                    return f"the {self.name} runtime needs the '{self.extra}' extra ({top} is not installed)"
                return f"{top} is not installed on this host"
        return None

    def versions(self) -> list:
        from ..stages.bundle import pkg_version

        return [pkg_version(p) for p in self.packages]

    def model_files(self, profile: TargetProfile) -> list[str]:
        raise NotImplementedError

    def artifact_files(self, profile: TargetProfile) -> list[str]:
        """The files an export/quantize entry keeps (the bundle's model files and their sources)."""
        return self.model_files(profile)

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        raise NotImplementedError

    def quantize_plan(self, profile: TargetProfile) -> list[tuple[str, dict]]:
        """The accuracy guard's attempts in order: (what, options for quantize())."""
        return [("plain", {})]

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        raise NotImplementedError

    def fallback(self, profile: TargetProfile, src: Path, out: Path, precision: str) -> str:
        """Write the fallback artifact into ``out``; returns the precision written (fp32 by default)."""
        for f in self.artifact_files(profile):
            copy_path(src / f, out / f)
        return "fp32"

    def platform_reason(self, profile: TargetProfile) -> str | None:
        """Why no host of this OS can run the artifact at all (Core ML off macOS), or None."""
        return None

    def host_reason(self, profile: TargetProfile) -> str | None:
        """Why this host cannot run the profile's device (the runtime being installed), or None."""
        return None

    def runner(self, profile: TargetProfile, artifact_dir: Path, precision: str) -> Runner:
        raise NotImplementedError

    def template_context(self, profile: TargetProfile, precision: str) -> dict:
        """What the bundle's infer.py/README templates need beyond the common context."""
        return {}

    def manifest_extra(self, profile: TargetProfile, artifact: Path) -> dict:
        """What the manifest's ``model`` records beyond the common fields (reports of the tools)."""
        return {}


@contextlib.contextmanager
def native_logs_dropped():
    """Native libraries (ExecuTorch's cpuinfo/threadpool) log to file descriptor 2 directly,
    past Python's redirection: drop that while they load and run here."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def copy_path(src: Path, dst: Path) -> None:
    """Copy a model file, or a model folder such as an .mlpackage, whole."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


ADAPTERS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "litert": "litert", "executorch": "executorch", "coreml": "coreml"}


def adapter(runtime: str) -> Adapter:
    return importlib.import_module(f".{ADAPTERS[runtime]}", __name__).ADAPTER


def open_runner(profile: TargetProfile, artifact_dir: Path, precision: str | None = None) -> Runner:
    return adapter(profile.runtime).runner(profile, artifact_dir, precision or profile.precision)
