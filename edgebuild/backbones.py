"""Backbone providers (python:, hf:, timm:, torchvision:), weight loading and head replacement.

A provider returns a plain ``nn.Module`` mapping an NCHW float tensor to logits. Weights come
from ``.safetensors`` or a state-dict ``.pt`` loaded with ``weights_only=True``: a pickle that
would need anything more is refused, never executed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

from .lazy import torch, nn

from .errors import ModelError, WeightsError, did_you_mean
from .files import check_path
from .training import load_state


@functools.lru_cache(maxsize=None)
def _logits_only():
    class LogitsOnly(nn.Module):
        """Wraps a model whose forward returns an object or dict with ``logits`` (Hugging Face)."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(pixel_values=x)
            return out.logits if hasattr(out, "logits") else out["logits"]

    return LogitsOnly  # defined on first use: importing this module does not import torch


def __getattr__(name: str):
    if name == "LogitsOnly":
        return _logits_only()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _python_provider(ref: str, root: Path, pretrained: bool | None = None) -> Callable[[], nn.Module]:
    """The factory loads what it likes; ``backbone.weights`` is the way to give it weights."""
    target, sep, func = ref.rpartition(":")
    if not sep or not target or not func:
        raise ModelError(f"backbone source 'python:{ref}' must be python:FILE.py:FUNC or python:pkg.module:FUNC", hint="name the factory function after the last ':'")
    if target.endswith(".py"):
        path = Path(target)
        path = path if path.is_absolute() else root / path
        check_path(path, "backbone file", ModelError, hint="paths in 'backbone.source' resolve against the build file's folder")
        # a name from the file's content, not its path: the same project in another folder gives
        # the same module (and class) names wherever they are recorded
        mod_name = "edgebuild_user_" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # user code: report, do not hide
            raise ModelError(f"{path}: importing the backbone file failed: {type(e).__name__}: {e}", hint="run the file with python to see the full error") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelError(f"cannot import backbone module '{target}': {e}", hint="install the package or use python:FILE.py:FUNC") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelError(f"backbone factory '{func}' not found in {target}: {did_you_mean(func, names)}", hint="name a function that returns an nn.Module")

    def build() -> nn.Module:
        try:
            model = fn()
        except Exception as e:
            raise ModelError(f"backbone factory {target}:{func} raised {type(e).__name__}: {e}", hint="fix the factory function") from e
        if not isinstance(model, nn.Module):
            raise ModelError(f"backbone factory {target}:{func} returned {type(model).__name__}, not a torch.nn.Module", hint="return the model instance")
        return model

    return build


def _hf_provider(ref: str, root: Path, pretrained: bool | None) -> Callable[[], nn.Module]:
    try:
        import transformers
    except ImportError:
        raise ModelError("hf: backbones need the 'transformers' package", hint="pip install 'edgebuild[hf]'") from None
    # a build loads the model once per stage that runs: no "Loading weights" bar each time
    transformers.utils.logging.disable_progress_bar()
    local = Path(ref) if Path(ref).is_absolute() else root / ref
    source = str(local) if local.is_dir() else ref

    def build() -> nn.Module:
        # pretrained None: the weights the folder or cache has; True: they must be there; False: config only
        if pretrained:
            pretrained_file(f"hf:{ref}", root, True)
        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
            has_weights = local.is_dir() and any(local.glob("*.safetensors")) or not local.is_dir()
            if has_weights and pretrained is not False:
                model = transformers.AutoModelForImageClassification.from_pretrained(source, local_files_only=True, use_safetensors=True)
            else:
                model = transformers.AutoModelForImageClassification.from_config(config)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"hf:{ref}: cannot load the model: {first}",
                hint="give a local folder with config.json (and optionally model.safetensors), or a model id already in the Hugging Face cache",
            ) from None
        return _logits_only()(model)

    return build


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # a torchvision built for another torch fails with more than ImportError
        hint = "pip install timm (with a matching torchvision), or use python:/hf:" if name == "timm" else \
            "install a torchvision built for your torch, or use python:/hf:"
        raise ModelError(f"{name}: backbones need the '{name}' package, which cannot be imported here ({type(e).__name__}: {e})", hint=hint) from None


def _timm_provider(ref: str, root: Path, pretrained: bool | None) -> Callable[[], nn.Module]:
    timm = _import("timm")

    def build() -> nn.Module:
        if not timm.is_model(ref):
            raise ModelError(f"unknown timm model '{ref}': {did_you_mean(ref, timm.list_models())}", hint="see timm.list_models()")
        model = timm.create_model(ref, pretrained=False)
        if pretrained:
            load_weights(model, pretrained_file(f"timm:{ref}", root, True))
        return model

    return build


def _torchvision_provider(ref: str, root: Path, pretrained: bool | None) -> Callable[[], nn.Module]:
    torchvision = _import("torchvision")

    def build() -> nn.Module:
        names = torchvision.models.list_models()
        if ref not in names:
            raise ModelError(f"unknown torchvision model '{ref}': {did_you_mean(ref, names)}", hint="see torchvision.models.list_models()")
        model = torchvision.models.get_model(ref, weights=None)
        if pretrained:
            load_weights(model, pretrained_file(f"torchvision:{ref}", root, True))
        return model

    return build


PROVIDERS = {"python": _python_provider, "hf": _hf_provider, "timm": _timm_provider, "torchvision": _torchvision_provider}


def factory(source: str, root: Path, pretrained: bool | None = None) -> Callable[[], nn.Module]:
    """``pretrained``: load the provider library's own weights (True), never (False), or, None,
    the provider's default: none for timm/torchvision, those in the folder or cache for hf."""
    scheme, _, ref = source.partition(":")
    if scheme not in PROVIDERS:
        raise ModelError(f"unknown backbone provider '{scheme}': {did_you_mean(scheme, PROVIDERS)}", hint="use python:, hf:, timm: or torchvision:")
    return PROVIDERS[scheme](ref, root, pretrained)


def pretrained_file(source: str, root: Path, pretrained: bool | None) -> Path | None:
    """The file the provider's own pretrained weights load from (see pretrained.py), or None where
    none are loaded. With ``pretrained`` True a missing file is an error naming its cache path."""
    from . import pretrained as cache

    scheme, _, ref = source.partition(":")
    if pretrained is False or scheme == "python" or (pretrained is None and scheme != "hf"):
        return None
    if scheme == "torchvision":
        _import("torchvision")
        return cache.torchvision_file(ref)
    if scheme == "timm":
        timm = _import("timm")
        try:
            cfg = timm.models.get_pretrained_cfg(ref)
        except Exception:
            cfg = None
        if cfg is None:
            raise ModelError(f"unknown timm model '{ref}' or no pretrained config for it", hint="see timm.list_models(pretrained=True)")
        return cache.timm_file(ref, cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    try:
        import huggingface_hub  # noqa: F401 - comes with transformers; without it the factory says what is missing
    except ImportError:
        return None
    local = Path(ref) if Path(ref).is_absolute() else root / ref
    found = cache.hf_file(ref, local)
    if found is None and pretrained:
        if local.is_dir():
            raise ModelError(f"hf:{ref}: pretrained is true but {local} holds no .safetensors weights",
                             hint="save the model there with save_pretrained(), or set pretrained: false to start from the config")
        raise cache.missing_hub(f"hf:{ref}", ref)
    return found


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # a folder, a fifo (would block the build forever), a device, a broken link: refused unopened
    check_path(path, "weights file", WeightsError, hint="fix 'backbone.weights' (relative paths resolve against the build file): a .safetensors or state-dict .pt file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({e})", hint="the file may be truncated; download or export it again") from None
    if suffix in (".pt", ".pth", ".bin"):
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # protocol notes from the safe unpickler
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            import re

            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            operand = re.search(r"Unsupported operand (\d+)", text)
            if found:
                why = f"it would load {found.group(1)}, not only tensors"
            elif operand:
                why = f"pickle opcode {int(operand.group(1))} is not allowed in weights (code or an unknown format)"
            else:
                why = " ".join(text.split())[:160]
            raise WeightsError(
                f"{path}: refused, not loaded: {why}",
                hint="edgebuild never unpickles arbitrary objects; save a plain state_dict with torch.save or use .safetensors",
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            first = " ".join(str(e).strip().splitlines()[0].split())[:200] if str(e).strip() else type(e).__name__
            raise WeightsError(f"{path}: cannot read the checkpoint ({first})", hint="the file may be truncated or not a torch checkpoint") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: not a state dict of tensors", hint="save model.state_dict(), not the model object")
        return obj
    raise WeightsError(f"{path}: unsupported weights format '{suffix}'", hint="use .safetensors or a state-dict .pt")


def load_weights(model: nn.Module, path: Path) -> None:
    sd = read_state_dict(path)
    target = model.model if isinstance(model, _logits_only()) and not any(k.startswith("model.") for k in sd) else model
    own = target.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]) + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
        raise WeightsError(f"{path}: weights do not fit the backbone ({'; '.join(parts)})", hint="check that the weights belong to this backbone source")
    load_state(target, sd)


def drop_auxiliary_heads(model: nn.Module) -> list[str]:
    """Remove the auxiliary classifiers of torchvision's GoogLeNet and Inception v3 (they run in
    training mode only, beside the main head): edgebuild trains the main head, and a branch that
    eval mode never runs is outside what pruning traces, so it would break training after pruning.
    Returns the names removed."""
    if not (isinstance(getattr(model, "aux_logits", None), bool) and model.aux_logits):
        return []
    model.aux_logits = False
    dropped = [n for n in ("aux1", "aux2", "AuxLogits") if isinstance(getattr(model, n, None), nn.Module)]
    for n in dropped:
        setattr(model, n, None)
    return dropped


# ----------------------------------------------------------------------------------------------
# Head replacement
# ----------------------------------------------------------------------------------------------


def find_head(model: nn.Module, name: str | None) -> str:
    modules = dict(model.named_modules())
    if name:
        for cand in (name, f"model.{name}"):
            if cand in modules and cand:
                return cand
        names = [n for n in modules if n]
        raise ModelError(f"classifier '{name}' not found in the backbone: {did_you_mean(name, names)}", hint="set 'backbone.classifier' to the module name of the old head")
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("the backbone has no nn.Linear to replace as its head", hint="set 'backbone.classifier' to the head's module name")
    return linears[-1]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def feature_size(model: nn.Module, head: str, example: torch.Tensor) -> int:
    seen: dict[str, Any] = {}

    def hook(_m, inputs):
        seen["x"] = inputs[0]

    h = model.get_submodule(head).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:
        raise ModelError(f"dry forward of the backbone failed with input {tuple(example.shape)}: {type(e).__name__}: {e}", hint="check preprocess.input_size and color against the backbone") from e
    finally:
        h.remove()
    if "x" not in seen:
        raise ModelError(f"the head '{head}' is never called in forward", hint="set 'backbone.classifier' to the module that produces the logits")
    x = seen["x"]
    if x.dim() != 2:
        raise ModelError(f"the head '{head}' receives a {x.dim()}-d input {tuple(x.shape)}; edgebuild replaces heads fed with (N, features)", hint="name the final nn.Linear as the classifier")
    return int(x.shape[1])


def replace_head(model: nn.Module, head: str, num_classes: int, example: torch.Tensor) -> int:
    feats = feature_size(model, head, example)
    _set_module(model, head, nn.Linear(feats, num_classes))
    return feats


def split_features(model: nn.Module, head: str) -> tuple[nn.Module, nn.Module]:
    """(model with the head replaced by Identity, the head): model(x) == head(features(x))."""
    import copy

    feats = copy.deepcopy(model)
    _set_module(feats, head, nn.Identity())
    return feats, model.get_submodule(head)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    _set_module(model, path, new)
