"""One adapter per runtime: load an artifact with a profile's settings, run it, benchmark it."""

from __future__ import annotations

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
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.static_batch or batch_size
        outs = []
        for b in range(0, len(x), step):
            chunk = x[b : b + step]
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


def open_runner(profile: TargetProfile, artifact_dir: Path, precision: str | None = None) -> Runner:
    if profile.runtime == "onnxruntime":
        from .onnxruntime import OrtRunner

        return OrtRunner(artifact_dir / "model.onnx", profile)
    from .openvino import OvRunner

    return OvRunner(artifact_dir / "model.xml", profile, precision or profile.precision)
