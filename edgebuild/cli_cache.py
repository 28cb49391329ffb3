"""``edgebuild cache ls | prune | clear``: what the stage cache holds (stage, build, target,
size, last use) and removing old entries."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '2w' or a number of seconds, as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r}: give a number and a unit: 30d, 12h, 90m, 2w (or seconds)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@click.group()
def cache():
    """The stage cache."""


_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="EDGEBUILD_CACHE_DIR")


@cache.command("ls")
@_cache_dir
def cache_ls(cache_dir):
    """Entries with stage, build, target, size and last use."""
    from .cache import Cache

    c = Cache(cache_dir)
    entries = c.entries()
    now = time.time()
    for e in entries:
        target = "(shared)" if e.get("target") == "" else (e.get("target") or "-")  # "-": not recorded
        click.echo(f"{e['stage']:<9} {e.get('build') or '-':<20} {target:<30} {e['key'][:12]}  "
                   f"{e['bytes'] / 1e6:8.2f} MB  {(now - e['last_used']) / 3600:7.1f} h ago")
    click.echo(f"{len(entries)} entries, {sum(e['bytes'] for e in entries) / 1e6:.2f} MB in {c.root}")


@cache.command("prune")
@click.option("--older-than", "older_than", required=True, metavar="AGE", help="remove entries not used for AGE (30d, 12h, 90m, 2w)")
@_cache_dir
def cache_prune(older_than, cache_dir):
    """Remove entries not used (built or read) for AGE."""
    from .cache import Cache

    c = Cache(cache_dir)
    n, freed = c.prune(parse_age(older_than))
    click.echo(f"removed {n} entries ({freed / 1e6:.2f} MB) not used for {older_than} from {c.root}")


@cache.command("clear")
@_cache_dir
def cache_clear(cache_dir):
    """Remove every entry."""
    from .cache import Cache

    c = Cache(cache_dir)
    n = c.clear()
    click.echo(f"removed {n} entries from {c.root}")
