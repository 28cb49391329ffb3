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

    def benchmark(self, sample: np.ndarray, warmup: int = 10, min_iters: int = 50, max_seconds: float = 5.0, progress=None,
                  rounds: int = 5, warmup_seconds: float = 0.3) -> dict:
        """Latency of one batch (the artifact's static batch, else 1).

        Warm-up runs for at least ``warmup`` calls and ``warmup_seconds`` (caches, thread pools,
        lazy kernel selection). The measurement is ``rounds`` rounds of equal length, together at
        least ``min_iters`` runs and about ``max_seconds``; p50/p90 are over all runs, and the
        spread of the per-round p90s says how far a single short measurement could be off."""
        import contextlib

        n = self.static_batch or 1
        x = np.ascontiguousarray(np.repeat(sample[:1], n, axis=0), dtype=np.float32)
        warm, t_warm = [], time.perf_counter() + warmup_seconds
        while len(warm) < warmup or (time.perf_counter() < t_warm and len(warm) < 50 * warmup):
            t0 = time.perf_counter()
            self._run(x)
            warm.append(time.perf_counter() - t0)
        one = max(float(np.median(warm[len(warm) // 2:])), 1e-6)  # seconds per run, once warm
        per_round = min(400, max(int(max_seconds / rounds / one), -(-min_iters // rounds)))
        if per_round * rounds * one > 3 * max_seconds:  # a slow model: fewer runs, never under 4 a round
            per_round = max(4, int(3 * max_seconds / rounds / one))
        label = f"benchmark {self.settings.get('runtime', '')} ({self.settings.get('threads', 'default')} threads)"
        times: list[float] = []
        p90s: list[float] = []
        with (progress.task(label, rounds * per_round) if progress else contextlib.nullcontext()) as task:
            for _ in range(rounds):
                chunk = []
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    self._run(x)
                    chunk.append((time.perf_counter() - t0) * 1000.0)
                times += chunk
                p90s.append(float(np.percentile(chunk, 90)))
                if task:
                    task.update(len(times), f"p50 {np.percentile(times, 50):.3f} ms")
            if task:
                task.update(len(times), f"p50 {np.percentile(times, 50):.3f} ms over {len(times)} runs")
        arr = np.asarray(times)
        p90 = float(np.percentile(arr, 90))
        return {
            "batch": n,
            "iterations": len(times),
            "warmup": len(warm),
            "rounds": rounds,
            "p50_ms": float(np.percentile(arr, 50)),
            "p90_ms": p90,
            "mean_ms": float(arr.mean()),
            "p90_rounds_ms": [round(v, 4) for v in p90s],
            # how far apart the rounds' p90s are, relative to the p90 over all runs
            "p90_spread_pct": round(100.0 * (max(p90s) - min(p90s)) / p90, 2) if p90 > 0 else 0.0,
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
    revision = 0  # bump when this adapter's files change for the same inputs (keys its cached steps)

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

        return [pkg_version(p) for p in self.packages] + ([f"{self.name} adapter revision {self.revision}"] if self.revision else [])

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
