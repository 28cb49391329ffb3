"""Backbone providers, safe weight loading, head replacement."""

import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

from edgebuild import backbones
from edgebuild.errors import ModelError, WeightsError

from conftest import TINY_BACKBONE


@pytest.fixture
def tiny_file(tmp_path):
    (tmp_path / "bb.py").write_text(TINY_BACKBONE)
    return tmp_path


def test_python_file_provider(tiny_file):
    m = backbones.factory("python:bb.py:build", tiny_file)()
    assert isinstance(m, nn.Module) and m(torch.zeros(1, 1, 16, 16)).shape == (1, 4)


def test_python_module_provider(tiny_file, monkeypatch):
    (tiny_file / "mypkg").mkdir()
    (tiny_file / "mypkg" / "__init__.py").write_text("")
    (tiny_file / "mypkg" / "nets.py").write_text(TINY_BACKBONE)
    monkeypatch.syspath_prepend(str(tiny_file))
    m = backbones.factory("python:mypkg.nets:build_rgb", tiny_file)()
    assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 4)


def test_python_provider_missing_function_suggests(tiny_file):
    with pytest.raises(ModelError, match="did you mean 'build'"):
        backbones.factory("python:bb.py:buidl", tiny_file)


def test_python_provider_missing_file(tiny_file):
    with pytest.raises(ModelError, match="not found"):
        backbones.factory("python:nope.py:build", tiny_file)


def test_factory_must_return_module(tiny_file):
    (tiny_file / "bad.py").write_text("def build():\n    return 42\n")
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        backbones.factory("python:bad.py:build", tiny_file)()


def test_hf_provider_from_local_config_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=7)
    cfg.save_pretrained(tmp_path / "resnet")
    m = backbones.factory("hf:resnet", tmp_path)()
    assert isinstance(m, backbones.LogitsOnly)
    x = torch.zeros(1, 3, 32, 32)
    assert m(x).shape == (1, 7)
    head = backbones.find_head(m, None)
    assert backbones.replace_head(m, head, 3, x) == 16
    assert m(x).shape == (1, 3)


def test_hf_provider_unknown_id_is_clear(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ModelError, match="cannot load"):
        backbones.factory("hf:no-such-org/no-such-model-xyz", tmp_path)()


@pytest.mark.parametrize("scheme", ["timm", "torchvision"])
def test_missing_provider_package_is_a_clear_error(tmp_path, monkeypatch, scheme):
    """Without the package (None in sys.modules makes the import fail, in any environment) the
    provider says which package is missing; the providers environment builds real models
    (tests/test_providers.py)."""
    monkeypatch.setitem(sys.modules, scheme, None)
    with pytest.raises(ModelError) as ei:
        backbones.factory(f"{scheme}:resnet18", tmp_path)
    assert f"'{scheme}' package, which cannot be imported here" in ei.value.message and ei.value.hint
    with pytest.raises(ModelError, match="cannot be imported"):
        backbones.pretrained_file(f"{scheme}:resnet18", tmp_path, True)


def _hf_resnet_folder(root, with_weights):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=7)
    if with_weights:
        torch.manual_seed(3)
        transformers.ResNetForImageClassification(cfg).save_pretrained(root)
    else:
        cfg.save_pretrained(root)
    return root


def test_hf_pretrained_true_needs_weights_in_the_folder(tmp_path):
    _hf_resnet_folder(tmp_path / "cfgonly", with_weights=False)
    with pytest.raises(ModelError, match="holds no .safetensors weights") as ei:
        backbones.factory("hf:cfgonly", tmp_path, pretrained=True)()
    assert str(tmp_path / "cfgonly") in ei.value.message
    assert backbones.pretrained_file("hf:cfgonly", tmp_path, None) is None
    backbones.factory("hf:cfgonly", tmp_path, pretrained=None)()  # unset: the config alone is fine


def test_hf_pretrained_true_false_and_unset_with_weights(tmp_path):
    from safetensors.torch import load_file

    folder = _hf_resnet_folder(tmp_path / "full", with_weights=True)
    saved = load_file(str(folder / "model.safetensors"))
    key = next(k for k in saved if k.endswith("convolution.weight"))
    for pretrained, loaded in ((True, True), (None, True), (False, False)):
        torch.manual_seed(0)
        m = backbones.factory("hf:full", tmp_path, pretrained=pretrained)()
        assert torch.equal(m.model.state_dict()[key], saved[key]) is loaded, pretrained
    assert backbones.pretrained_file("hf:full", tmp_path, True) == folder / "model.safetensors"


def test_hf_pretrained_id_missing_from_hub_cache_names_the_path(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as ei:
        backbones.pretrained_file("hf:someorg/tiny-net", tmp_path, True)
    assert str(tmp_path / "hub" / "models--someorg--tiny-net") in ei.value.message
    assert "hf download someorg/tiny-net model.safetensors" in ei.value.hint


def test_safetensors_and_pt_weights(tiny_file, tmp_path):
    from safetensors.torch import save_file

    src = backbones.factory("python:bb.py:build", tiny_file)()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        dst = backbones.factory("python:bb.py:build", tiny_file)()
        backbones.load_weights(dst, tmp_path / f)
        assert torch.equal(dst.fc.weight, src.fc.weight)


def test_malicious_pickle_is_refused_and_never_executed(tiny_file, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": Evil()}, f)
    m = backbones.factory("python:bb.py:build", tiny_file)()
    with pytest.raises(WeightsError, match="refused"):
        backbones.load_weights(m, tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_safetensors(tiny_file, tmp_path):
    from safetensors.torch import save_file

    src = backbones.factory("python:bb.py:build", tiny_file)()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        backbones.load_weights(src, tmp_path / "t.safetensors")


def test_shape_mismatch_lists_keys(tiny_file, tmp_path):
    from safetensors.torch import save_file

    m = backbones.factory("python:bb.py:build", tiny_file)()
    sd = dict(m.state_dict())
    sd["fc.weight"] = torch.zeros(9, 16)
    sd.pop("fc.bias")
    sd["extra.thing"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError) as ei:
        backbones.load_weights(m, tmp_path / "w.safetensors")
    msg = ei.value.message
    assert "fc.weight (9, 16) vs model (4, 16)" in msg and "missing: fc.bias" in msg and "unexpected: extra.thing" in msg


def test_head_default_is_last_linear_and_named_head_checked(tiny_file):
    m = backbones.factory("python:bb.py:build", tiny_file)()
    assert backbones.find_head(m, None) == "fc"
    with pytest.raises(ModelError, match="did you mean"):
        backbones.find_head(m, "fcc")


def test_replace_head_in_sequential(tiny_file):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    head = backbones.find_head(m, None)
    assert head == "3"
    assert backbones.replace_head(m, head, 2, torch.zeros(1, 1, 8, 8)) == 4
    assert m(torch.zeros(1, 1, 8, 8)).shape == (1, 2)


VERSIONED_BACKBONE = '''
import torch
from torch import nn


class Versioned(nn.Module):
    """Refuses a state dict without its version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def build():
    return Versioned()
'''


def test_modules_that_need_their_state_dict_version_load_from_safetensors(tiny_project):
    """Weights, transfer and prune entries are safetensors, which keep no per-module version:
    the model's own is used (torchvision's MNASNet crashed the prune stage with a traceback)."""
    import importlib.util

    from safetensors.torch import load_file, save_file

    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build
    from edgebuild.training import load_state

    from conftest import write_config

    (tiny_project / "backbone.py").write_text(VERSIONED_BACKBONE)
    spec = importlib.util.spec_from_file_location("versioned_backbone", tiny_project / "backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    save_file(mod.build().state_dict(), str(tiny_project / "backbone.safetensors"))
    sd = load_file(str(tiny_project / "backbone.safetensors"))
    with pytest.raises(ValueError, match="version should be set"):
        mod.build().load_state_dict(sd)
    m = mod.build()
    load_state(m, sd)
    assert torch.equal(m.fc.weight, sd["fc.weight"])
    p = write_config(tiny_project, epochs=1, extra="compress:\n  prune: {ratio: 0.5, recover_epochs: 2}\n")
    r = Build(load_build_config(p), out=tiny_project / "dist").run().report
    assert r["compression"]["align 8"]["prune"]["params"] < r["compression"]["align 8"]["prune"]["params_before"]


AUX_BACKBONE = '''
from collections import namedtuple

import torch
from torch import nn

Outputs = namedtuple("Outputs", ["logits", "aux_logits"])


class WithAux(nn.Module):
    """Like torchvision's GoogLeNet: an auxiliary classifier's scores beside the main ones in training mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.aux, self.fc = nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x):
        f = self.body(x)
        return Outputs(self.fc(f), self.aux(f)) if self.training else self.fc(f)


def build():
    return WithAux()
'''


def test_a_model_with_auxiliary_outputs_in_training_mode_trains_on_its_main_logits(tiny_project):
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    from conftest import write_config

    (tiny_project / "backbone.py").write_text(AUX_BACKBONE)
    (tiny_project / "backbone.safetensors").unlink()
    p = write_config(tiny_project, epochs=3)
    text = p.read_text().replace("  weights: backbone.safetensors\n", "")
    p.write_text(text)
    r = Build(load_build_config(p), out=tiny_project / "dist").run().report
    assert r["transfer"]["val_accuracy"] > 0.5  # it learned (3 classes): the main head was trained


TV_AUX_BACKBONE = '''
from collections import namedtuple

import torch
from torch import nn

Outputs = namedtuple("Outputs", ["logits", "aux_logits1"])


class GoogLeNetLike(nn.Module):
    """torchvision's GoogLeNet in miniature: aux_logits, and an auxiliary head on an inner
    feature map that only training mode runs."""

    def __init__(self, aux_logits=True):
        super().__init__()
        self.aux_logits = aux_logits
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.aux1 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)) if aux_logits else None
        self.pool, self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(16, 10)

    def forward(self, x):
        f = self.conv1(x)
        aux = self.aux1(f) if self.aux1 is not None and self.training else None
        out = self.fc(self.pool(self.conv2(f)))
        return Outputs(out, aux) if self.training and self.aux_logits else out


def build():
    return GoogLeNetLike()
'''


def test_auxiliary_heads_are_dropped_so_pruning_and_recovery_work(tiny_project):
    """The pruned model's aux head (never traced: eval mode skips it) broke training mode."""
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    from conftest import write_config

    (tiny_project / "backbone.py").write_text(TV_AUX_BACKBONE)
    (tiny_project / "backbone.safetensors").unlink()
    p = write_config(tiny_project, epochs=2, extra="compress:\n  prune: {ratio: 0.5, recover_epochs: 1}\n")
    p.write_text(p.read_text().replace("  weights: backbone.safetensors\n", ""))
    r = Build(load_build_config(p), out=tiny_project / "dist").run().report
    comp = r["compression"]["align 8"]["prune"]
    assert comp["params"] < comp["params_before"]
    ns = {}
    exec(TV_AUX_BACKBONE, ns)
    m = ns["build"]()
    assert backbones.drop_auxiliary_heads(m) == ["aux1"] and m.aux1 is None and m.aux_logits is False
    assert backbones.drop_auxiliary_heads(ns["GoogLeNetLike"](aux_logits=False)) == []
