"""Progress reporting: rich bars on a terminal, plain log lines otherwise, nothing with --json."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Progress:
    def __init__(self, mode: str = "auto"):
        """mode: 'rich' (bars), 'plain' (lines on stderr), 'quiet' (nothing), 'auto'."""
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() and sys.stderr.isatty() else "plain"
        self.mode = mode
        self._console = None
        if mode == "rich":
            from rich.console import Console

            self._console = Console(stderr=True)

    def log(self, msg: str) -> None:
        if self.mode == "quiet":
            return
        if self._console is not None:
            self._console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator["_Task"]:
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

            with RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=self._console, transient=False) as rp:
                tid = rp.add_task(description, total=total, info="")
                yield _Task(lambda n, info: rp.update(tid, completed=n, info=info or ""))
        else:
            t0 = time.perf_counter()
            last = {"info": ""}

            def update(n: int, info: str | None) -> None:
                if info and self.mode == "plain" and not description.startswith("benchmark"):
                    print(f"  {description} {n}/{total} {info}", file=sys.stderr, flush=True)
                last["info"] = info or last["info"]

            yield _Task(update)
            if self.mode == "plain":
                extra = f" ({last['info']})" if last["info"] and description.startswith("benchmark") else ""
                print(f"  {description}: done in {time.perf_counter() - t0:.1f}s{extra}", file=sys.stderr, flush=True)


class _Task:
    def __init__(self, update):
        self._update = update

    def update(self, n: int, info: str | None = None) -> None:
        self._update(n, info)
