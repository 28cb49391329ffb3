"""Jinja rendering with StrictUndefined and per-language escaping filters.

User strings (names, labels, paths) only ever enter generated files through these filters,
never as template source, so they are data in every output language.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache

import jinja2

from .resources import templates_dir


def pyrepr(v) -> str:
    """A Python literal that evaluates to ``v`` (str, number, bool, None, list, tuple, dict)."""
    return repr(v)


def pycomment(v) -> str:
    """Text safe inside a Python comment: one line, no control characters."""
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]", " ", str(v))


def cpp_string(v) -> str:
    """A C++ narrow string literal holding the UTF-8 bytes of ``v`` exactly."""
    out = []
    for b in str(v).encode("utf-8"):
        ch = chr(b)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 32 <= b < 127 and ch != "?":  # '?' avoids trigraphs
            out.append(ch)
        else:
            out.append("\\%03o" % b)  # octal escapes are at most 3 digits: never run into the next char
    return '"' + "".join(out) + '"'


def cpp_int(v) -> str:
    """A C++ int literal; refuses anything that is not an integer (bools included)."""
    if isinstance(v, bool) or not isinstance(v, int) or not -(2**31) < v < 2**31:
        raise ValueError(f"not an int for C++ source: {v!r}")
    return str(v)


def cpp_float(v) -> str:
    """A C++ double literal with the exact value of the Python float ``v`` (shortest repr
    round-trips; casting it to float then rounds exactly as numpy's float32 does)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"not a finite number for C++ source: {v!r}")
    r = repr(float(v))
    assert re.fullmatch(r"-?[0-9]+(\.[0-9]*)?(e[-+]?[0-9]+)?", r), r
    return r


def md(v) -> str:
    """Inline Markdown text with only what would change meaning escaped, so a README reads cleanly
    in a terminal too: backslash, backtick, ``*``, ``<``/``>``, ``|``, ``~``; brackets where they
    could form a link; ``_`` at
    a word's edge (inside a word it is literal); and, at the start, what would begin a heading,
    list or quote."""
    s = pycomment(v)
    s = re.sub(r"([\\`*<>|~])", r"\\\1", s)
    if re.search(r"\][(\[:]", s):  # brackets only matter where they could make a link
        s = re.sub(r"([\[\]])", r"\\\1", s)
    s = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    s = re.sub(r"^(\s*)([#+=-])(?=\s|$)", r"\1\\\2", s)
    return re.sub(r"^(\s*\d+)([.)])(?=\s|$)", r"\1\\\2", s)


def mdcode(v) -> str:
    """A Markdown code span holding ``v`` literally (fenced with more backticks than it has)."""
    s = pycomment(v)
    run = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (run + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def to_json(v) -> str:
    return json.dumps(v, ensure_ascii=False)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters.update(pyrepr=pyrepr, pycomment=pycomment, cpp_string=cpp_string, cpp_int=cpp_int, cpp_float=cpp_float, md=md, mdcode=mdcode, tojson_text=to_json)
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
