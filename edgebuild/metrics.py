"""Model statistics: parameters, multiply-accumulates, accuracy and agreement."""

from __future__ import annotations

import numpy as np
from .lazy import torch, nn


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example`` (batch 1), conv and linear layers."""
    total = [0]

    def conv_hook(m: nn.Conv2d, _inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += int(out.numel() // out.shape[0]) * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, _inp, out):
        total[0] += int(out.numel() // out.shape[0]) * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(targets)).mean()) if len(targets) else 0.0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean()) if len(a) else 0.0


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def confusion(logits: np.ndarray, targets: np.ndarray, n_classes: int) -> list[list[int]]:
    """Confusion matrix as rows of true class, columns of predicted class (counts)."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    if len(targets):
        np.add.at(m, (np.asarray(targets, np.int64), np.asarray(logits).argmax(1)), 1)
    return m.tolist()
