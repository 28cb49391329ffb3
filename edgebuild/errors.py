"""The one error root of edgebuild.

Every error a user can cause is an :class:`EdgebuildError` with a one-line message and a
hint; the CLI turns it into ``error:``/``hint:`` lines and the exit code of its class. Any
other exception is a bug (exit 1, traceback shown).
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence


def one_line(text: object) -> str:
    """``text`` as one printable line: control characters (newlines included), line and paragraph
    separators and lone surrogates (undecodable file names) are written as escapes, so a hostile
    name can neither break the ``error:``/``hint:`` format nor crash printing it."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class EdgebuildError(Exception):
    """Base of all expected errors. ``exit_code`` is what the CLI exits with. Message and hint
    are kept to one printable line each (see :func:`one_line`)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = one_line(message)
        hint = one_line(hint) if hint is not None else None
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class ConfigError(EdgebuildError):
    """The build file or a target profile is wrong."""


class DataError(EdgebuildError):
    """The dataset (image folders, images) is wrong."""


class WeightsError(EdgebuildError):
    """A weights file is missing, corrupt, unsafe or does not fit the model."""


class ModelError(EdgebuildError):
    """The model cannot be built, adapted, pruned, exported or quantized."""


class BundleError(EdgebuildError):
    """A bundle is altered, incomplete, unsafe or of an unknown schema."""


class EmulationError(EdgebuildError):
    """This host cannot emulate the target's arch (qemu, debootstrap or binfmt missing), or the
    emulated root could not be made."""


class RuntimeMissing(EdgebuildError):
    """A profile's runtime needs an optional extra that is not installed."""


class GateFailed(EdgebuildError):
    """A budget or validation gate failed. ``rows`` lists (target, budget, limit, limit from, measured)."""

    exit_code = 3

    def __init__(self, message: str, rows: Sequence[tuple[str, ...]], hint: str | None = None):
        super().__init__(message, hint)
        self.rows = list(rows)


_OPPOSITES = [("min", "max"), ("max", "min")]


def _inverts(name: str, choice: str) -> bool:
    """True when ``choice`` would turn ``name`` into its opposite (min_* -> max_*): a suggestion
    must never invert what the user meant."""
    a, b = set(re.split(r"[^a-z0-9]+", name.lower())), set(re.split(r"[^a-z0-9]+", choice.lower()))
    return any(x in a and y in b and x not in b for x, y in _OPPOSITES)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to a misspelled one, or None (never one of opposite meaning)."""
    found = difflib.get_close_matches(str(name), [str(c) for c in choices if not _inverts(str(name), str(c))], n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    choices = sorted(str(c) for c in choices)
    best = closest(name, choices)
    allowed = ", ".join(choices)
    if best:
        return f"did you mean '{best}'? allowed: {allowed}"
    return f"allowed: {allowed}"
