"""Pydantic validation errors as one readable ConfigError: the file, each field path, the bad
value and what is allowed (an unknown key gets the allowed keys and the closest one)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, closest



def _model_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Allowed keys at a location inside ``model`` (for 'unknown key' errors)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        cur = _unwrap_model(ann)
        if cur is None:
            return None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [k for k, f in cur.model_fields.items() if not f.exclude]
    return None


def _unwrap_model(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


_UNION_TAG = re.compile(r"^(function-(before|after|wrap|plain)\[.*\]|literal\[.*\]|int|float|str|bool|[a-z]+\[.*\])$")
MAX_PROBLEMS = 6


def _clean_loc(loc: tuple, kind: str) -> tuple:
    """The field path without pydantic's union-member tags ('batch.literal['dynamic']' -> 'batch')."""
    keep = [p for i, p in enumerate(loc) if not (isinstance(p, str) and _UNION_TAG.match(p) and not (kind == "extra_forbidden" and i == len(loc) - 1))]
    return tuple(keep)


def format_validation_error(err: ValidationError, path: Path, model: type[BaseModel]) -> ConfigError:
    lines: list[str] = []
    by_field: dict[str, int] = {}  # a union's alternatives on one field become one problem
    hint = None
    for e in err.errors():
        kind = e.get("type", "")
        loc = _clean_loc(tuple(e.get("loc", ())), kind)
        field = ".".join(str(p) for p in loc) or "(top level)"
        value = e.get("input")
        if kind == "extra_forbidden":
            allowed = _model_fields(model, loc) or []
            key = str(loc[-1]) if loc else "?"
            best = closest(key, allowed)
            msg = f"unknown key '{field}'"
            if best:
                msg += f" (did you mean '{best}'?)"
            msg += f"; allowed keys here: {', '.join(allowed)}"
            lines.append(msg)
            hint = hint or (f"rename '{key}' to '{best}'" if best else f"remove the key '{key}'")
            continue
        if kind == "missing":
            lines.append(f"'{field}' is required")
            hint = hint or f"add '{loc[-1]}:' to the file"
            continue
        msg = e.get("msg", "invalid value")
        if kind == "literal_error":
            expected = (e.get("ctx") or {}).get("expected", "")
            allowed = [a.strip().strip("'\"") for a in expected.replace(" or ", ",").split(",") if a.strip()]
            best = closest(str(value), allowed)
            msg = f"must be one of {', '.join(allowed)}" + (f" (did you mean '{best}'?)" if best else "")
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if field in by_field:
            lines[by_field[field]] += f", or {msg}"
            continue
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        by_field[field] = len(lines)
        lines.append(f"'{field}' = {shown}: {msg}")
        hint = hint or f"fix '{field}'; see the README for the allowed values"
    total = len(lines)
    if total > MAX_PROBLEMS:
        lines = lines[:MAX_PROBLEMS] + [f"(+{total - MAX_PROBLEMS} more)"]
    head = f"{path}: " + lines[0] if total == 1 else f"{path}: {total} problems: " + "; ".join(lines)
    return ConfigError(head, hint=hint or "fix the file; see the README for the build-file reference")
