"""Strict readers for the structured text edgebuild takes from users: YAML and JSON.

YAML (build files, target profiles, list files) is read with a SafeLoader that

- refuses duplicate keys (PyYAML keeps the last one silently: a whole ``transfer:`` block
  could vanish under a second one),
- turns every failure while a value is built (an impossible date, ``!!int x``, an integer
  of thousands of digits, ...) into a ConfigError naming the file, line and column,
- refuses documents whose aliases expand to more than MAX_NODES values (a "billion laughs"
  document is small on disk but huge once validated),
- never builds Python objects (tags beyond the YAML core schema are refused, as before).

JSON (list files, manifests) refuses duplicate keys and numbers Python cannot hold the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Type

import yaml

from .errors import ConfigError, EdgebuildError
from .files import check_path

MAX_NODES = 100_000  # values after alias expansion; a build file has a few hundred
MAX_BYTES = 16 << 20


class DuplicateKey(yaml.constructor.ConstructorError):
    pass


class BadValue(yaml.constructor.ConstructorError):
    pass


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys and reports bad values with their place."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except RecursionError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure building a value is bad input
            shown = node.value if isinstance(node, yaml.ScalarNode) else node.id
            if isinstance(shown, str) and len(shown) > 40:
                shown = shown[:37] + "..."
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            reason = " ".join(str(e).split())[:120] or type(e).__name__
            raise BadValue(None, None, f"cannot read {shown!r} as {tag} ({reason})", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' merges; an explicit key may override a merged one
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class refuses unhashable keys with its own message
                if key in seen:
                    first = seen[key]
                    raise DuplicateKey(None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""


def _count(data: Any, limit: int) -> int:
    """Values in ``data`` with shared (aliased) parts counted each time they appear; stops past limit."""
    n, stack = 0, [data]
    while stack:
        v = stack.pop()
        n += 1
        if n > limit:
            return n
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def parse_yaml(text: str, path: Path, what: str, error: Type[EdgebuildError] = ConfigError) -> Any:
    """The YAML document in ``text`` (from ``path``) as plain data, or ``error`` with file and line."""
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except DuplicateKey as e:
        raise error(f"{path}:{_where(e)} {e.problem}", hint="each key may appear once per mapping; remove or merge the repeated one") from None
    except BadValue as e:
        raise error(f"{path}:{_where(e)} {e.problem}",
                    hint="quote the value to keep it as text, or write a valid number/date; remove the '!!' tag if there is one") from None
    except yaml.constructor.ConstructorError as e:
        # !!python/object and other tags: the safe loader never builds them; say so plainly
        tag = re.search(r"tag '([^']*)'", str(e))
        raise error(f"{path}:{_where(e)} refused: YAML tag {tag.group(1) if tag else '(unknown)'!r} is not allowed",
                    hint=f"a {what} is plain YAML (mappings, lists, strings, numbers); remove the '!' tag") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}:{_where(e)} YAML syntax error: {problem}", hint="fix the YAML syntax at that line") from None
    except RecursionError:
        raise error(f"{path}: the YAML is nested too deeply to read", hint=f"a {what} is a shallow mapping; see the README") from None
    if _count(data, MAX_NODES) > MAX_NODES:
        raise error(f"{path}: the YAML expands to more than {MAX_NODES} values (aliases repeated inside aliases?)",
                    hint=f"a {what} is small; write the values out instead of nesting '*' aliases")
    return data


def read_text(path: Path, what: str, error: Type[EdgebuildError] = ConfigError) -> str:
    """A user's text file, checked to be a regular file first (a fifo would block forever)."""
    st = check_path(path, what, error, hint="pass the file itself (relative paths resolve against the current folder)")
    if st.st_size > MAX_BYTES:
        raise error(f"{path}: {st.st_size} bytes, too large for a {what}", hint=f"a {what} is a small text file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", hint="save the file as UTF-8") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})", hint="check the file's permissions") from None


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (a build file or target profile), or ConfigError."""
    data = parse_yaml(read_text(path, what), path, what)
    if data is None:
        raise ConfigError(f"{path}: the file is empty", hint=f"a {what} is a YAML mapping; see the README for an example")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top, got {type(data).__name__}",
                          hint=f"a {what} is a mapping of keys such as 'name:' and 'backbone:'")
    return data


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str | bytes) -> Any:
    """json.loads that refuses duplicate keys, NaN/Infinity and integers Python refuses to
    convert (raises ValueError with the reason; JSONDecodeError is a ValueError)."""
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
