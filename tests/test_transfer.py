"""The three transfer modes on tiny data; determinism; features mode speed."""

import json

import numpy as np
import pytest
import torch

from edgebuild.config import load_build_config
from edgebuild.pipeline import Build
from edgebuild.head import L2_GRID
from edgebuild.stages import transfer

from conftest import write_config


def run_transfer(root, mode, epochs=3, tmp=None):
    cfg = load_build_config(write_config(root, mode=mode, epochs=epochs))
    b = Build(cfg)
    out = (tmp or root) / f"out-{mode}"
    out.mkdir()
    meta = transfer.run(cfg, b.data(), out, progress=None)
    return cfg, meta, out


@pytest.mark.parametrize("mode", ["finetune", "features", "scratch"])
def test_each_mode_trains_and_round_trips(tiny_project, mode):
    cfg, meta, out = run_transfer(tiny_project, mode)
    assert meta["mode"] == mode and meta["classes"] == ["a", "b", "c"]
    assert len(meta["history"]) == (len(L2_GRID) if mode == "features" else 3) and meta["head"] == "fc" and meta["features"] == 16
    assert 0.0 <= meta["val_accuracy"] <= 1.0
    model = transfer.load_model(cfg, out)
    x = torch.as_tensor(np.asarray(Build(cfg).data().Xval))
    logits = np.load(out / "val_logits.npy")
    np.testing.assert_allclose(model(x).detach().numpy(), logits, atol=1e-5)


def test_finetune_learns_the_task(tiny_project):
    _, meta, _ = run_transfer(tiny_project, "finetune", epochs=6)
    assert meta["val_accuracy"] >= 0.8, meta["history"]


def test_features_mode_freezes_backbone(tiny_project):
    cfg, meta, out = run_transfer(tiny_project, "features")
    from safetensors.torch import load_file

    trained = load_file(str(out / "model.safetensors"))
    pre = load_file(str(cfg.resolve(cfg.backbone.weights)))
    for k, v in pre.items():
        if not k.startswith("fc."):
            assert torch.equal(trained[k], v), k


def test_same_seed_same_weights(tiny_project, tmp_path):
    _, _, a = run_transfer(tiny_project, "finetune", epochs=2, tmp=tmp_path / "1" if (tmp_path / "1").mkdir() is None else None)
    _, _, b = run_transfer(tiny_project, "finetune", epochs=2, tmp=tmp_path / "2" if (tmp_path / "2").mkdir() is None else None)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_warmup_epochs_recorded(tiny_project, monkeypatch):
    """Warm-up trains the head only: right after it the backbone's weights are still the
    pretrained ones and the head's are not; the fine-tuning after it moves the backbone."""
    from safetensors.torch import load_file

    cfg = load_build_config(write_config(tiny_project, extra="", epochs=1))
    cfg.transfer.warmup_epochs = 1
    out = tiny_project / "o"
    out.mkdir()
    after_fit = []
    real_fit = transfer.fit

    def recording_fit(model, *a, **k):  # the real fit; a copy of the weights after each call
        r = real_fit(model, *a, **k)
        after_fit.append((k.get("label"), {n: p.detach().clone() for n, p in model.named_parameters()}))
        return r

    monkeypatch.setattr(transfer, "fit", recording_fit)
    meta = transfer.run(cfg, Build(cfg).data(), out, progress=None)
    assert [h.get("phase") for h in meta["history"]] == ["warmup", None]
    assert [label for label, _ in after_fit] == ["transfer (head warm-up)", "transfer (finetune)"]
    pre = load_file(str(cfg.resolve(cfg.backbone.weights)))
    warm, final = after_fit[0][1], after_fit[1][1]
    backbone = [n for n in warm if not n.startswith("fc.")]
    assert backbone and all(torch.equal(warm[n], pre[n]) for n in backbone), "the backbone moved during warm-up"
    assert any(not torch.equal(final[n], pre[n]) for n in backbone)  # fine-tuning trains it
    assert all(p.requires_grad for p in transfer.load_model(cfg, out).parameters())


def test_features_mode_refuses_head_that_is_not_last(tiny_project):
    (tiny_project / "odd.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(256, 4)\n"
        "    def forward(self, x):\n        return torch.tanh(self.fc(x.flatten(1)))\n"
        "def build():\n    return M()\n"
    )
    text = write_config(tiny_project, mode="features").read_text()
    text = text.replace("python:backbone.py:build", "python:odd.py:build").replace("  weights: backbone.safetensors\n", "")
    (tiny_project / "edgebuild.yaml").write_text(text)
    cfg = load_build_config(tiny_project / "edgebuild.yaml")
    from edgebuild.errors import ModelError

    out = tiny_project / "o"
    out.mkdir()
    with pytest.raises(ModelError, match="last layer"):
        transfer.run(cfg, Build(cfg).data(), out, progress=None)


# ------------------------------------------------------------------------------ augmentation
from edgebuild.augment import Augment  # noqa: E402
from edgebuild.config import AugmentConfig, TransferConfig  # noqa: E402
from edgebuild.training import fit  # noqa: E402


def test_augment_is_seeded_and_changes_the_batch():
    x = torch.randn(8, 3, 12, 12)
    a = Augment(AugmentConfig(), [0.5] * 3, [0.25] * 3, 3, seed=1)
    b = Augment(AugmentConfig(), [0.5] * 3, [0.25] * 3, 3, seed=1)
    c = Augment(AugmentConfig(), [0.5] * 3, [0.25] * 3, 3, seed=2)
    ya, yb, yc = a(x), b(x), c(x)
    assert torch.equal(ya, yb) and not torch.equal(ya, yc) and not torch.equal(ya, x) and ya.shape == x.shape


def test_augment_flip_only_mirrors():
    x = torch.randn(64, 1, 6, 6)
    aug = Augment(AugmentConfig(crop_scale=(1.0, 1.0), hflip=True, color_jitter=0.0), [0.0], [1.0], 1, seed=0)
    y = aug(x)
    for i in range(len(x)):  # every sample is itself or its mirror image
        assert torch.allclose(y[i], x[i], atol=1e-5) or torch.allclose(y[i], x[i].flip(-1), atol=1e-5)
    assert any(not torch.allclose(y[i], x[i], atol=1e-5) for i in range(len(x)))


def test_augment_defaults_per_mode():
    assert TransferConfig(mode="finetune").effective_augment == AugmentConfig()
    assert TransferConfig(mode="scratch").effective_augment is not None
    assert TransferConfig(mode="features").effective_augment is None
    assert TransferConfig(mode="finetune", augment=False).effective_augment is None
    assert TransferConfig(mode="finetune", augment={"hflip": False}).effective_augment.hflip is False


class _Recorder(torch.nn.Module):
    """A linear model that records every batch it sees in training and in eval."""

    def __init__(self, d, k):
        super().__init__()
        self.fc = torch.nn.Linear(d, k)
        self.seen = {"train": [], "eval": []}

    def forward(self, x):
        self.seen["train" if self.training else "eval"].append(x.detach().clone())
        return self.fc(x.flatten(1))


def test_augment_applies_to_training_batches_only():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 1, 4, 4, generator=g).numpy()
    y = np.arange(20) % 2
    model = _Recorder(16, 2)
    marker = []

    def aug(xb):
        marker.append(len(xb))
        return xb + 1000.0

    fit(model, model.parameters(), X, y, X, y, epochs=2, lr=0.01, batch_size=8, seed=0, augment=aug)
    assert sum(marker) == 40
    assert all(b.min() > 900 for b in model.seen["train"]) and all(b.max() < 900 for b in model.seen["eval"])


# ------------------------------------------------------------------------------ best epoch, patience, optimizers
def _task(seed=0, n=60):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 2, 4, generator=g)
    y = (X.flatten(1)[:, 0] > 0).long()
    return X.numpy(), y.numpy()


def test_best_epoch_is_kept_and_patience_stops():
    X, y = _task()
    Xv, yv = _task(seed=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
    # a huge lr makes later epochs worse than the first good one
    r = fit(model, model.parameters(), X, y, Xv, yv, epochs=12, lr=5.0, batch_size=4, seed=0, patience=2)
    accs = [h["val_accuracy"] for h in r.history]
    assert r.best_epoch == 1 + int(np.argmax(accs))
    from edgebuild.training import predict

    final = float((predict(model, Xv).argmax(1) == yv).mean())
    assert final == max(accs)
    if r.stopped_early:
        assert len(r.history) - r.best_epoch == 2 and len(r.history) < 12


def test_optimizers_learn_and_differ():
    X, y = _task()
    weights = {}
    for optimizer in ("sgd", "adamw"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
        cfg = TransferConfig(optimizer=optimizer)
        r = fit(model, model.parameters(), X, y, X, y, epochs=15, lr=cfg.effective_lr * 10, batch_size=8, seed=0, optimizer=optimizer,
                label_smoothing=0.1)
        assert r.history[-1]["loss"] < r.history[0]["loss"] and max(h["val_accuracy"] for h in r.history) >= 0.85, (optimizer, r.history)
        weights[optimizer] = model[1].weight.detach().clone()
    assert not torch.allclose(weights["sgd"], weights["adamw"])
    assert TransferConfig().effective_lr == 0.01 and TransferConfig(optimizer="adamw").effective_lr == 0.001


def test_lr_schedule_warms_up_then_decays():
    from edgebuild.training import lr_factor

    f = [lr_factor(s, 5, 50) for s in range(50)]
    assert f[0] < f[4] < f[5] == 1.0 and all(a >= b for a, b in zip(f[5:], f[6:])) and f[-1] < 0.01


def test_features_head_is_solved_and_folds_standardisation():
    from edgebuild.head import fit_logistic

    g = np.random.default_rng(0)
    F = g.normal(size=(200, 6)) * np.array([100, 1, 1, 1, 1, 0.01]) + 50
    y = (F[:, 0] - 50 + 100 * (F[:, 1])) > 0
    head = torch.nn.Linear(6, 2)
    hist = fit_logistic(head, F[:150], y[:150].astype(int), F[150:], y[150:].astype(int))
    with torch.no_grad():
        acc = float((head(torch.as_tensor(F[150:], dtype=torch.float32)).argmax(1).numpy() == y[150:]).mean())
    sel = [h for h in hist if h["selected"]]
    assert len(sel) == 1 and acc == pytest.approx(sel[0]["val_accuracy"]) and acc >= 0.9


def test_features_are_cached_in_the_store(tiny_project, tmp_path):
    cfg = load_build_config(write_config(tiny_project, mode="features"))
    b = Build(cfg)
    cache = tmp_path / "feats"
    (tmp_path / "o1").mkdir()
    (tmp_path / "o2").mkdir()
    m1 = transfer.run(cfg, b.data(), tmp_path / "o1", progress=None, features_cache=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["train.npy", "val.npy"]
    np.save(cache / "train.npy", np.load(cache / "train.npy") * 0)  # a second run must read these, not recompute
    m2 = transfer.run(cfg, b.data(), tmp_path / "o2", progress=None, features_cache=cache)
    assert m1["history"] != m2["history"]


def test_feature_pass_on_onnxruntime_matches_eager(tiny_project, tmp_path, monkeypatch):
    cfg = load_build_config(write_config(tiny_project, mode="features"))
    data = Build(cfg).data()
    (tmp_path / "e").mkdir()
    (tmp_path / "o").mkdir()
    eager = transfer.run(cfg, data, tmp_path / "e", progress=None, features_cache=tmp_path / "fe")
    monkeypatch.setattr(transfer, "ORT_MIN_IMAGES", 0)
    onnx = transfer.run(cfg, data, tmp_path / "o", progress=None, features_cache=tmp_path / "fo")
    assert eager["feature_engine"].startswith("torch eager") and onnx["feature_engine"].startswith("onnxruntime")
    np.testing.assert_allclose(np.load(tmp_path / "fo" / "train.npy"), np.load(tmp_path / "fe" / "train.npy"), atol=1e-4)
    assert abs(onnx["val_accuracy"] - eager["val_accuracy"]) <= 1 / 15 + 1e-9


def test_progress_within_an_epoch(monkeypatch):
    from contextlib import contextmanager

    from edgebuild import training

    lines = []

    class P:
        @contextmanager
        def task(self, label, total):
            class T:
                def update(self, n, info=None):
                    lines.append((n, total, info))
            yield T()

    monkeypatch.setattr(training, "NOTE_SECONDS", 0.0)
    X, y = _task()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
    fit(model, model.parameters(), X, y, X, y, epochs=2, lr=0.01, batch_size=8, seed=0, progress=P())
    within = [info for n, total, info in lines if "step" in info]
    assert within and all("loss" in i and "ETA" in i and "epoch" in i for i in within)
    assert lines[-1][0] == lines[-1][1] == 2 * 8  # counted in steps: 2 epochs of 8 batches
