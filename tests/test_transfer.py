"""The three transfer modes on tiny data; determinism; features mode speed."""

import json

import numpy as np
import pytest
import torch

from edgebuild.config import load_build_config
from edgebuild.pipeline import Build
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
    assert len(meta["history"]) == 3 and meta["head"] == "fc" and meta["features"] == 16
    assert 0.0 <= meta["val_accuracy"] <= 1.0
    model = transfer.load_model(cfg, out)
    x = torch.as_tensor(Build(cfg).data().Xval)
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
