"""The search's statistics: the Pareto front of latency and accuracy, the rank correlation of
proxy and final accuracy, and a finalist's accuracy drop paired image by image."""

from __future__ import annotations

import numpy as np


def pareto(rows: list[dict], acc_key: str = "proxy_accuracy") -> list[int]:
    """Indices of rows no other row beats on both latency (lower) and accuracy (higher)."""
    front = []
    for i, r in enumerate(rows):
        if not any((o["p50_ms"] <= r["p50_ms"] and o[acc_key] >= r[acc_key]) and (o["p50_ms"] < r["p50_ms"] or o[acc_key] > r[acc_key])
                   for o in rows):
            front.append(i)
    return front


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def paired_drop(base_hits: np.ndarray, hits: np.ndarray) -> tuple[float, float]:
    """The accuracy drop from ``base_hits`` to ``hits`` (which of the same images each model gets
    right) and the half-width of its 95% interval: a normal approximation over the per-image
    differences, so images both models get right or wrong add no noise."""
    diff = np.asarray(base_hits, np.float64) - np.asarray(hits, np.float64)
    ci = 1.96 * float(diff.std(ddof=1)) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return round(float(diff.mean()), 6), round(ci, 6)
