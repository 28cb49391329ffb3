"""Where the built-in target profiles and templates live (in the wheel or the source tree)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for cand in (_PKG / "_data" / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise RuntimeError(f"edgebuild installation is incomplete: no '{name}' folder next to {_PKG}")


def targets_dir() -> Path:
    return _find("targets")


def templates_dir() -> Path:
    return _find("templates")
