"""Publishing a build into the output folder, atomically as a whole.

Layout of ``dist/`` (what users and ``verify`` see keeps its documented names)::

    dist/.generations/g-.../        one complete build: bundles, archives, sidecars, report.*
    dist/.current -> .generations/g-...    the published generation
    dist/NAME-TARGET -> .current/NAME-TARGET          (and .tar.gz, .tar.gz.sha256,
    dist/report.json -> .current/report.json           report.html likewise)
    dist/failed-report.json, failed-report.html        the last failed build's report, if any
    dist/.lock                                         held by the build writing dist/

A new generation is written completely beside the published one; then one ``rename`` of a
symbolic link (``.current``) switches every published name at once. A kill at any instant
leaves either the old generation or the new one published, bundles, archives and report
together; an unfinished generation is removed by the next build. Bundles of targets the build
did not touch are carried into the new generation (hard links), as the old layout kept them.

``EDGEBUILD_TEST_PUBLISH_DELAY=SECONDS`` announces each step on stderr and sleeps there (the
interruption tests kill the build at every step).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import ConfigError, EdgebuildError

CURRENT = ".current"
GENERATIONS = ".generations"
REPORTS = ("report.json", "report.html")
FAILED = {"report.json": "failed-report.json", "report.html": "failed-report.html"}
DELAY_ENV = "EDGEBUILD_TEST_PUBLISH_DELAY"


def step(name: str) -> None:
    """A publishing step: with EDGEBUILD_TEST_PUBLISH_DELAY set, say so and wait there."""
    delay = os.environ.get(DELAY_ENV)
    if delay:
        print(f"publish step: {name}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a uniquely named temporary file and one rename. An error
    names ``path``, never the temporary file: a folder in its place is an EdgebuildError (exit 2),
    any other OSError is raised again with ``path`` as its file name."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # as a plain write would leave it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(e, OSError) or e.errno is None:
            raise
        if e.errno == errno.EISDIR:  # rename(2) of a file over a folder
            raise EdgebuildError(f"cannot write {path}: Is a directory (edgebuild writes a file there)",
                                 hint=f"move the folder {path} out of the way, or pass another -o") from e
        raise OSError(e.errno, e.strerror, str(path)) from e


def current(out: Path) -> Path | None:
    """The published generation folder, or None (nothing published, or the old layout)."""
    link = out / CURRENT
    if not os.path.islink(link):
        return None
    gen = out / os.readlink(link)
    return gen if gen.is_dir() else None


def _link(out: Path, name: str, target: str) -> None:
    """``out/name`` becomes a symbolic link to ``target``, replacing a link by one rename."""
    dst = out / name
    if os.path.islink(dst) and os.readlink(dst) == target:
        return
    if os.path.lexists(dst) and not os.path.islink(dst):
        kind = "Is a directory" if os.path.isdir(dst) else "File exists"
        raise EdgebuildError(f"cannot publish {dst}: {kind}, and it is not a link edgebuild made",
                             hint=f"move {dst} out of the output folder (edgebuild publishes links there), or pass another -o")
    tmp = out / f".{name}.link-{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def _carry(src: Path, dst: Path) -> None:
    """Copy a file or folder by hard links (a plain copy where links are not possible)."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)
    else:
        link_or_copy(src, dst)


def _legacy_entries(out: Path) -> list[str]:
    """What a build of the old layout left at the top of ``out``: bundle folders, archives,
    sidecars and reports as real files (anything else is the user's and stays untouched)."""
    entries = [p for p in sorted(out.iterdir()) if not p.name.startswith(".") and not p.is_symlink()]
    bundles = {p.name for p in entries if p.is_dir() and (p / "manifest.json").is_file()}
    archives = {f"{b}.tar.gz" for b in bundles} | {f"{b}.tar.gz.sha256" for b in bundles}
    return [p.name for p in entries if p.name in bundles or (p.is_file() and (p.name in REPORTS or p.name in archives))]


def _adopt_legacy(out: Path, gens: Path) -> None:
    """Turn real folders and files of the old layout (or left by a build killed while adopting
    them) into links into the published generation, without a moment where a name is missing:
    a hard-linked copy goes into the generation, then one swap per name."""
    names = _legacy_entries(out)
    if not names:
        return
    cur = current(out)
    if cur is None:
        cur = Path(tempfile.mkdtemp(prefix="g-legacy-", dir=gens))
        os.chmod(cur, 0o755)
        for n in names:
            _carry(out / n, cur / n)
        _flip(out, cur)
    for n in names:
        if not os.path.lexists(cur / n):
            _carry(out / n, cur / n)  # not visible until its link is swapped in below
        tmp = out / f".{n}.link-{os.getpid()}-{os.urandom(4).hex()}"
        os.symlink(f"{CURRENT}/{n}", tmp)
        if exchange(tmp, out / n):  # atomic: out/n is the link, tmp the old real entry
            old = tmp
        else:
            old = out / f".{n}.old-{os.getpid()}"
            os.replace(out / n, old)
            os.replace(tmp, out / n)
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    step("adopted")


def _flip(out: Path, gen: Path) -> None:
    tmp = out / f"{CURRENT}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(f"{GENERATIONS}/{gen.name}", tmp)
    os.replace(tmp, out / CURRENT)  # the one atomic switch


def sweep(out: Path) -> None:
    """Remove generations that are not published (left by a killed build) and stray link
    temporaries. Called with the output lock held, so no other build is writing one."""
    gens = out / GENERATIONS
    keep = current(out)
    if gens.is_dir():
        for g in gens.iterdir():
            if keep is None or g.name != keep.name:
                shutil.rmtree(g, ignore_errors=True)
    for p in out.iterdir():
        if p.name.startswith(".") and (".link-" in p.name or p.name.startswith(f"{CURRENT}.tmp-")):
            try:
                p.unlink()
            except OSError:
                pass


def publish(staging: Path, staged: list[str], out: Path, make_archive: Callable[[Path, Path, str], str],
            write_report: Callable[[Path], None]) -> list[Path]:
    """Publish the finished bundles in ``staging`` (and the report ``write_report(folder)``
    writes) as one new generation of ``out``. Ctrl-C and SIGTERM wait until the switch is done;
    kill -9 cannot be held off, but leaves the old or the new build published, never a mix."""
    gens = out / GENERATIONS
    gens.mkdir(exist_ok=True)
    sweep(out)
    _adopt_legacy(out, gens)
    gen = Path(tempfile.mkdtemp(prefix=f"g-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-", dir=gens))
    os.chmod(gen, 0o755)
    for name in staged:
        make_archive(staging / name, gen / f"{name}.tar.gz", name)
        step(f"archive {name}")
        os.replace(staging / name, gen / name)
        step(f"bundle {name}")
    prev = current(out)
    for n in sorted(os.listdir(prev)) if prev is not None else ():
        if n in REPORTS or n.startswith(".") or os.path.lexists(gen / n):
            continue
        _carry(prev / n, gen / n)  # another target's bundle from an earlier build
    step("carried")
    write_report(gen)
    step("report")
    caught: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        for n in sorted(os.listdir(gen)):
            _link(out, n, f"{CURRENT}/{n}")
        step("links")
        _flip(out, gen)
        step("flipped")
        for n in FAILED.values():  # the published build is newer than the last failure
            try:
                os.unlink(out / n)
            except FileNotFoundError:
                pass
        sweep(out)
        step("swept")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if caught:  # honoured now that the new build is published whole
        raise KeyboardInterrupt
    return [out / name for name in staged]


def write_failed_report(out: Path, texts: dict[str, str]) -> Path:
    """A failed build's report beside the published one (which stays as it was)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_atomic(out / FAILED[name], text)  # a folder in the way: an error naming it
    return out / FAILED["report.html"]


def check_output(out: Path) -> None:
    """The output folder must be a folder we can write; say so before hours of training."""
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(f"cannot write the output folder {out}: {problem}", hint="pass -o with a folder you can write to")
