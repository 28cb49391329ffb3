"""Which limit applies to a target, and where it came from.

The rule (README "Budgets"): a limit in the build file's ``budgets:`` wins over the profile's
default, looser or tighter. A profile can mark a limit as a hard device limit
(``hard_budgets: [max_size_mb]``): the build file may tighten a hard limit but never loosen it,
so there the stricter of the two applies. Every limit carries its source into the gate table.
"""

from __future__ import annotations

from .config import Budgets, TargetProfile

BUILD = "build file"


def _stricter(key: str, a: float, b: float) -> float:
    return max(a, b) if key.startswith("min_") else min(a, b)


def resolve(profile: TargetProfile, build: Budgets) -> dict[str, dict]:
    """``{key: {"value": limit, "source": where it came from}}`` for every limit that is set."""
    out: dict[str, dict] = {}
    hard = set(profile.hard_budgets)
    for key in Budgets.model_fields:
        p, b = getattr(profile.budgets, key), getattr(build, key)
        if p is None and b is None:
            continue
        if b is None:
            out[key] = {"value": p, "source": f"profile {profile.name}" + (" (hard device limit)" if key in hard else " (default)")}
        elif p is None:
            out[key] = {"value": b, "source": BUILD}
        elif key in hard and _stricter(key, p, b) == p and p != b:
            out[key] = {"value": p, "source": f"profile {profile.name} (hard device limit; build file's {b:g} would loosen it)"}
        else:
            out[key] = {"value": b, "source": f"{BUILD} (profile default {p:g})"}
    return out


def values(profile: TargetProfile, build: Budgets) -> dict[str, float]:
    return {k: v["value"] for k, v in resolve(profile, build).items()}


def annotate(rows: list[dict], resolved: dict[str, dict]) -> list[dict]:
    """Each gate row with the source of its limit (``source``)."""
    for r in rows:
        key = str(r.get("budget", "")).split(" ")[0]
        if "source" in r:
            continue
        if key in resolved:
            r["source"] = resolved[key]["source"]
        elif key == "parity":
            r["source"] = "edgebuild (precision tolerance)"
        elif key == "int8":
            r["source"] = "quantize accuracy guard"
        else:
            r["source"] = ""
    return rows


def profile_defaults(profile: TargetProfile) -> list[str]:
    """One line per default limit of a profile, for ``targets show`` and the README."""
    hard = set(profile.hard_budgets)
    lines = []
    for key in Budgets.model_fields:
        v = getattr(profile.budgets, key)
        if v is not None:
            lines.append(f"{key}: {v:g}" + ("  (hard device limit: the build file can only tighten it)" if key in hard else "  (default: the build file's budgets override it)"))
    return lines
