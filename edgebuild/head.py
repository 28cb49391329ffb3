"""The ``features`` mode's head: multinomial logistic regression with L2, solved by L-BFGS on
cached features, the L2 strength picked by val accuracy; the result is the model's Linear head.

Features are standardised for the solver; the scaling is folded back into the head's weights,
so model(x) == head(features(x)) still holds with the raw features."""

from __future__ import annotations

import numpy as np
from .lazy import torch, nn, F

L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4)  # strongest first; each solve starts from the previous one
MAX_ITER = 500


def fit_logistic(head: nn.Linear, Ftr: np.ndarray, ytr: np.ndarray, Fva: np.ndarray, yva: np.ndarray,
                 label_smoothing: float = 0.0, l2_grid=L2_GRID, max_iter: int = MAX_ITER, progress=None) -> list[dict]:
    """Set ``head``'s weight and bias; returns one history row per L2 strength tried."""
    X = torch.as_tensor(np.asarray(Ftr), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(ytr), dtype=torch.int64)
    Xv = torch.as_tensor(np.asarray(Fva), dtype=torch.float64)
    yv = torch.as_tensor(np.asarray(yva), dtype=torch.int64)
    mu, sd = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
    Xs, Xvs = (X - mu) / sd, (Xv - mu) / sd
    k, d = head.out_features, X.shape[1]
    W = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    history, best = [], None
    ctx = progress.task("transfer (features: L-BFGS logistic regression)", len(l2_grid)) if progress else None
    task = ctx.__enter__() if ctx else None
    try:
        for i, lam in enumerate(l2_grid):
            opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                                    history_size=20, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(Xs @ W.T + b, y, label_smoothing=label_smoothing) + 0.5 * lam * (W * W).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                loss = float(F.cross_entropy(Xs @ W.T + b, y, label_smoothing=label_smoothing) + 0.5 * lam * (W * W).sum())
                acc = float(((Xvs @ W.T + b).argmax(1) == yv).double().mean()) if len(yv) else 0.0
                iters = int(opt.state[opt._params[0]].get("n_iter", 0))  # noqa: SLF001 - LBFGS keeps its count here
            history.append({"epoch": i + 1, "l2": lam, "iterations": iters, "loss": loss, "val_accuracy": acc})
            if best is None or acc > best[0]:
                best = (acc, W.detach().clone(), b.detach().clone(), lam)
            if task:
                task.update(i + 1, f"l2 {lam:g}: {iters} iterations, loss {loss:.4f}, val_acc {acc:.4f}")
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    _, Wb, bb, lam = best
    with torch.no_grad():
        Wr = Wb / sd
        head.weight.copy_(Wr.to(head.weight.dtype))
        head.bias.copy_((bb - Wr @ mu).to(head.bias.dtype))
    for h in history:
        h["selected"] = h["l2"] == lam
    return history
