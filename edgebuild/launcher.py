"""The launcher side of a multi-process build: ``edgebuild build --nproc N`` starts torchrun.

The parent process (``relaunch``) runs ``python -m torch.distributed.run --nproc-per-node N
--standalone -m edgebuild ...`` and returns rank 0's exit code, which rank 0 leaves in a status
file named by EDGEBUILD_DIST_STATUS_FILE (``write_status_file``; the first status written wins,
so a peer's lost contact never hides the root cause). ``exit_code_of`` maps an exception to the
exit code the CLI gives for it. The ranks' side (process group, collectives, shared stages) is
``edgebuild.distributed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

STATUS_FILE_ENV = "EDGEBUILD_DIST_STATUS_FILE"


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``argv`` (edgebuild's arguments, without --nproc) under torchrun with ``nproc``
    local processes; returns rank 0's exit code (torchrun's own where rank 0 left none)."""
    fd, status = tempfile.mkstemp(prefix="edgebuild-status-")
    os.close(fd)
    os.unlink(status)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", "-m", "edgebuild", *argv]
    env = dict(os.environ, **{STATUS_FILE_ENV: status})
    proc = subprocess.Popen(cmd, env=env)
    try:
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun and the workers too
            try:
                proc.wait(timeout=60)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            return 130
        try:
            return int(Path(status).read_text())
        except (OSError, ValueError):
            return rc if rc else 0
    finally:
        try:
            os.unlink(status)
        except OSError:
            pass


def write_status_file(code: int) -> None:
    """For ``--nproc``: the first status written wins (the root cause, not a peer's lost contact)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(str(code))


def exit_code_of(exc: BaseException | None) -> int:
    """The exit code the CLI gives for ``exc`` (mirrors cli.Group / cli.main)."""
    import click

    from .errors import EdgebuildError

    if exc is None:
        return 0
    if isinstance(exc, EdgebuildError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt) or isinstance(exc, click.exceptions.Abort):
        return 130
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    return 1
