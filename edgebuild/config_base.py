"""The building blocks of the typed build file (config.py, config_compress.py): strict models
and number fields that refuse YAML booleans and non-finite values."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from .errors import did_you_mean


def _number(v: Any) -> Any:
    """YAML reads yes/no/on/off/true/false as booleans, and pydantic would take them as 1/0;
    a number field refuses them (never rewrite a user's setting silently), and non-finite values."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()} (YAML reads yes/no/on/off as booleans)")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


MAX_SIDE = 8192  # the largest input height or width

Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SOURCE_SCHEMES = ("python", "hf", "timm", "torchvision")


def known_source(v: str) -> str:
    """A backbone source: SCHEME:REFERENCE with a known scheme."""
    scheme, sep, rest = v.partition(":")
    if not sep or not rest:
        raise ValueError(f"expected SCHEME:REFERENCE with SCHEME one of {', '.join(SOURCE_SCHEMES)}")
    if scheme not in SOURCE_SCHEMES:
        raise ValueError(f"unknown provider '{scheme}': {did_you_mean(scheme, SOURCE_SCHEMES)}")
    return v
