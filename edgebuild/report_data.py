"""report.json's content, assembled from a finished build, and the writing of report.json and
report.html (rendered by report.py) into the output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .plan import Step, plan_json, prune_label

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Build


def assemble(b: "Build", steps: list[Step], tmeta: dict, targets_report: dict, seconds: float) -> dict:
    from .report_sections import slower_notes

    report = {
        "schema": "edgebuild.report/1",
        "name": b.cfg.name,
        "version": b.cfg.version,
        "edgebuild": __version__,
        "seconds": seconds,
        "plan": plan_times(b, steps),
        "classes": list(b.data().classes),
        "curves": curves(b, tmeta, steps),
        "stage_seconds": b.stage_times,
        "transfer": {k: v for k, v in tmeta.items() if k != "history"} | {"history": tmeta.get("history")},
        "targets": targets_report,
    }
    for name, note in slower_notes(report).items():  # a profile that loses to another of its runtime says so
        targets_report[name]["slower"] = note
    return report


def plan_times(b: "Build", steps: list[Step]) -> list[dict]:
    """The plan with the seconds each step took in this build, and for a cached step the
    seconds it took when it was built (marked cached in the report)."""
    rows = plan_json(steps)
    for row, s in zip(rows, steps):
        row["seconds"] = b.step_seconds.get((s.stage, s.key))
        if s.cached and s.entry is not None:
            try:
                row["original_seconds"] = json.loads((s.entry / "entry.json").read_text()).get("seconds")
            except (OSError, ValueError):
                row["original_seconds"] = None
    return rows


def curves(b: "Build", tmeta: dict, steps: list[Step]) -> dict:
    """Loss and val accuracy per epoch of each training run (transfer, prune recovery)."""
    out = {f"transfer ({tmeta.get('mode', '')})": tmeta.get("history") or []}
    for s in (s for s in steps if s.stage == "prune"):
        entry = s.entry if s.entry is not None else b.cache.get(s.stage, s.key)
        try:
            hist = json.loads((entry / "meta.json").read_text()).get("history") if entry else None
        except (OSError, ValueError):
            hist = None
        if hist:
            out[f"prune recovery ({prune_label(s.params)})"] = hist
    return {k: v for k, v in out.items() if v}


def texts(report: dict) -> dict[str, str]:
    """report.json and report.html as text."""
    from .report import render_html

    return {"report.json": json.dumps(report, indent=2, default=str), "report.html": render_html(report)}


def write(out: Path, report: dict) -> None:
    """The report files into ``out`` (a generation folder being published), each through a
    uniquely named temporary file (two builds never share one)."""
    from .publish import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    for fname, text in texts(report).items():
        write_atomic(out / fname, text)
