"""The plan of a build: one Step per stage and target, keyed up front from params and input
keys, and why each step that is not cached runs (the plan printed before a build and in the
report)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .cache import make_key, stable_json


@dataclass
class Step:
    stage: str
    target: str  # "" for shared stages
    key: str
    params: dict
    inputs: dict
    cached: bool = False
    reason: str = ""
    entry: Optional[Path] = None  # the cache entry the plan found (checked once, reused by _stage)
    same_as: str = ""  # an earlier target whose step has the same key (one export for both)


def step(stage, target: str, params: dict, inputs: dict) -> Step:
    """A step of ``stage`` (a stages.* module) keyed by its name, version, params and inputs."""
    return Step(stage.NAME, target, make_key(stage.NAME, stage.VERSION, params, inputs), params, inputs)


def _changes(now: Any, before: Any, prefix: str, path: str = "") -> list[str]:
    """Dotted paths of what differs between two JSON values, with both values when short:
    ``transfer.lr 0.01 -> 0.02``."""
    if isinstance(now, dict) and isinstance(before, dict):
        out = []
        for k in sorted(set(now) | set(before)):
            out += _changes(now.get(k), before.get(k), prefix, f"{path}.{k}" if path else str(k))
        return out
    if now == before:
        return []
    a, b = stable_json(before), stable_json(now)
    if len(a) + len(b) <= 40 and not (isinstance(now, str) and len(now) >= 32):
        return [f"{prefix}{path} {a} -> {b}"]
    return [f"{prefix}{path}"]


def why(cache, step: Step, name: str) -> str:
    """Why a step that is not cached runs: --force, no cache, new, or what changed since the
    newest entry of the same stage, target and build name."""
    if not cache.enabled:
        return "--force"
    stage_dir = cache.root / step.stage
    if not stage_dir.is_dir():
        return "no cache yet"
    # the most recent entry of this stage for this target, to name what changed
    best, best_t = None, -1.0
    for d in stage_dir.iterdir():
        e = d / "entry.json"
        if not e.is_file():
            continue
        try:
            desc = json.loads(e.read_text()).get("describe", {})
        except (OSError, ValueError):
            continue
        if desc.get("target") != step.target or desc.get("name") != name:
            continue
        t = e.stat().st_mtime
        if t > best_t:
            best, best_t = desc, t
    if best is None:
        return "new"
    # the entry was stored as JSON: compare like with like (a tuple reads back as a list)
    now = json.loads(stable_json({"params": step.params, "inputs": step.inputs}))
    changed = _changes(now["params"], best.get("params", {}), "") + _changes(now["inputs"], best.get("inputs", {}), "input ")
    return "changed: " + ", ".join(changed) if changed else "changed"


def prune_label(params: dict) -> str:
    """A prune step as stage tables name it: its align, and its input size where not the build's."""
    size = params.get("input_size")
    return f"align {params['align']}" + (f", input {size[0]}x{size[1]}" if size else "")


def print_plan(progress, name: str, n_targets: int, steps: list[Step]) -> None:
    progress.log(f"plan for {name} ({n_targets} target(s)):")
    also = {}
    for s in steps:
        if s.same_as:
            also.setdefault((s.stage, s.same_as), []).append(s.target)
    for s in steps:
        if s.same_as:
            continue  # another target's step with the same key: built (or read) once
        label = s.stage + (f" [{s.target}]" if s.target else " [shared]") + (f" {prune_label(s.params)}" if s.stage == "prune" else "")
        shared = also.get((s.stage, s.target))
        note = f" (also for {', '.join(shared)})" if shared else ""
        progress.log(f"  {label:<48} {'cached' if s.cached else 'run'}{'' if s.cached else ' (' + s.reason + ')'}{note}")


def plan_json(steps: list[Step]) -> list[dict]:
    return [{"stage": s.stage, "target": s.target, "key": s.key, "cached": s.cached, "reason": s.reason, "same_as": s.same_as} for s in steps]
