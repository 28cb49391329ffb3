"""``backbone.pretrained: true``: the provider library's own pretrained weights, from its cache.

edgebuild never downloads. The file is looked up where the library itself would have stored it:

- ``torchvision:NAME``: the model's DEFAULT weights, ``$TORCH_HOME/hub/checkpoints/<file of the
  weights' URL>`` (``torch.hub.get_dir()``), the same file ``torchvision.models.get_model(NAME,
  weights="DEFAULT")`` downloads;
- ``timm:NAME[.TAG]``: the model's pretrained config; with a Hugging Face Hub id (every current
  timm weight) the HF hub cache (``HF_HUB_CACHE`` / ``HF_HOME``), ``model.safetensors`` or
  ``pytorch_model.bin`` of the cached snapshot; with an old-style URL, torch hub's checkpoints;
- ``hf:ID``: the model's cached snapshot (``model.safetensors``), ``hf:FOLDER``: the folder's
  ``model.safetensors``.

The file is read by edgebuild's safe loader (safetensors, or ``torch.load(weights_only=True)``)
and must fit the architecture exactly. A missing file is exit 2 naming the path and how to fill
it, whatever ``HF_HUB_OFFLINE`` says.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from .errors import ModelError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _torch_hub_file(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def _missing_torch_hub(source: str, path: Path, url: str) -> ModelError:
    return ModelError(
        f"{source}: pretrained weights are not in the torch hub cache: {path} is missing (edgebuild never downloads)",
        hint=f"download {url} to that path on a machine with network and copy it here (TORCH_HOME moves the cache), "
        "or set backbone.weights to a local file",
    )


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_file(repo_id: str, filenames=HUB_FILES, revision: str | None = None) -> Path | None:
    """The first of ``filenames`` in the HF hub cache's snapshot of ``repo_id``, never fetched."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache_dir(), revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def missing_hub(source: str, repo_id: str, filename: str = HUB_FILES[0]) -> ModelError:
    folder = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    return ModelError(
        f"{source}: pretrained weights are not in the Hugging Face hub cache: {folder}/snapshots/<revision>/{filename} is missing "
        "(edgebuild never downloads)",
        hint=f"on a machine with network run `hf download {repo_id} {filename}` (huggingface_hub's CLI fills this cache) and "
        "copy the cache folder here (HF_HUB_CACHE or HF_HOME move it), or set backbone.weights to a local file",
    )


def torchvision_file(name: str) -> Path:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ModelError(f"torchvision:{name}: torchvision publishes no pretrained weights for this model",
                         hint="set backbone.weights to a local file, or pretrained: false") from None
    path = _torch_hub_file(weights.url)
    if not path.is_file():
        raise _missing_torch_hub(f"torchvision:{name}", path, weights.url)
    return path


def timm_file(name: str, pretrained_cfg: dict) -> Path:
    """``pretrained_cfg``: the timm model's ``pretrained_cfg`` (it names the weights' source)."""
    source = f"timm:{name}"
    if pretrained_cfg.get("file"):
        path = Path(pretrained_cfg["file"])
        if not path.is_file():
            raise ModelError(f"{source}: the pretrained file {path} is missing", hint="restore the file or set backbone.weights")
        return path
    repo = pretrained_cfg.get("hf_hub_id")
    if repo:
        repo = repo.split("@")[0]  # 'org/name@revision' is not used by timm's default configs
        names = (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else HUB_FILES
        found = hub_file(repo, names)
        if found is None:
            raise missing_hub(source, repo, names[0])
        return found
    url = pretrained_cfg.get("url")
    if url:
        path = _torch_hub_file(url)
        if not path.is_file():
            raise _missing_torch_hub(source, path, url)
        return path
    raise ModelError(f"{source}: timm has no pretrained weights for this model", hint="set backbone.weights to a local file, or pretrained: false")


def hf_file(ref: str, local: Path) -> Path | None:
    """The weights file of an ``hf:`` source: the folder's, or the hub cache's; None when absent."""
    if local.is_dir():
        files = sorted(local.glob("*.safetensors"))
        return files[0] if files else None
    return hub_file(ref, ("model.safetensors",))
