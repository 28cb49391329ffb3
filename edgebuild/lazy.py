"""Heavy libraries imported on first use, so that commands and builds that never touch them
(a fully cached rebuild, ``targets list``, ``verify``) do not pay for importing them.

``from .lazy import torch, nn, F`` gives names that behave like the modules: the first attribute
access imports the real one. Class bodies and decorators are evaluated at import time, so they
must not touch these names at module level (use :func:`no_grad` instead of ``@torch.no_grad()``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


class LazyModule:
    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def _module(self):
        return importlib.import_module(self.__dict__["_name"])

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module(), attr)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<lazy module {self.__dict__['_name']}>"


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")
safetensors_torch = LazyModule("safetensors.torch")


def no_grad(fn):
    """``@torch.no_grad()`` without importing torch when the module is imported."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch as _torch

        with _torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
