"""Sections of report.html computed from report.json: training curves (inline SVG), per-class
results and confusion matrices, and which artifacts lose to another of the same runtime."""

from __future__ import annotations

import html
import math

CURVE_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
MAX_MATRIX_CLASSES = 30  # larger matrices are left to report.json
SLOWER_MARGIN = 1.10  # p50 more than 10% above another artifact's (beyond run-to-run noise)


def curves_svg(curves: dict, width: int = 440, height: int = 240) -> str:
    """Two panels side by side: training loss and val accuracy per epoch, one line per run."""
    if not curves:
        return '<p class="notrun">no training history (the model was not trained in this build\'s cache entries)</p>'
    panels = []
    for key, label in (("loss", "training loss"), ("val_accuracy", "val accuracy")):
        series = {name: [(h["epoch"], h[key]) for h in hist if h.get(key) is not None and h.get("epoch") is not None]
                  for name, hist in curves.items()}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        panels.append(_panel(series, label, key == "val_accuracy", width, height))
    legend = " ".join(f'<span style="color:{CURVE_COLORS[i % len(CURVE_COLORS)]}">&#9632; {html.escape(n)}</span>' for i, n in enumerate(curves))
    return '<div class="curves">' + "".join(panels) + f'</div><p class="meta">{legend}</p>'


def _panel(series: dict, label: str, is_accuracy: bool, width: int, height: int) -> str:
    left, right, top, bottom = 50, 10, 10, 36
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    if is_accuracy:
        y0, y1 = accuracy_axis(ys)
    else:
        y0, y1 = 0.0, max(ys) * 1.05 or 1.0

    def sx(v):
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v):
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{html.escape(label)} per epoch">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + pw}" y2="{sy(v):.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.2f}</text>')
    step = max(1, math.ceil((x1 - x0) / 10))
    for e in range(int(x0), int(x1) + 1, step):
        out.append(f'<text x="{sx(e):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{e}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">epoch · {html.escape(label)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" class="curve"><title>{html.escape(name)}</title></polyline>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"><title>{html.escape(name)}: epoch {x}, {html.escape(label)} {y:.4f}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def accuracy_axis(ys: list[float], min_span: float = 0.10) -> tuple[float, float]:
    """An accuracy axis that shows at least ``min_span`` (10 points), inside [0, 1] where the
    values are: two results 2 points apart must not fill the whole height."""
    lo, hi = min(ys), max(ys)
    pad = max((hi - lo) * 0.1, 0.005)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if hi > 1.0 and max(ys) <= 1.0:
        lo, hi = lo - (hi - 1.0), 1.0
    if lo < 0.0 and min(ys) >= 0.0:
        lo, hi = 0.0, hi - lo
    return lo, hi


def per_class(confusion: list[list[int]], classes: list[str]) -> list[dict]:
    """Per true class: count, recall (that class's accuracy), precision, F1, and the class it is
    most often mistaken for."""
    n = len(confusion)
    rows = []
    col = [sum(confusion[r][c] for r in range(n)) for c in range(n)]
    for i in range(n):
        row = confusion[i]
        total, hit = sum(row), row[i]
        recall = hit / total if total else None
        precision = hit / col[i] if col[i] else None
        f1 = 2 * precision * recall / (precision + recall) if recall and precision else (0.0 if total else None)
        wrong = max((c for c in range(n) if c != i), key=lambda c: row[c], default=None)
        rows.append({"class": classes[i] if i < len(classes) else str(i), "n": total, "recall": recall, "precision": precision, "f1": f1,
                     "confused_with": (classes[wrong] if wrong is not None and wrong < len(classes) else None) if wrong is not None and row[wrong] else None,
                     "confused_n": row[wrong] if wrong is not None else 0})
    return rows


def matrix_html(confusion: list[list[int]], classes: list[str]) -> str:
    """The confusion matrix as an HTML table, cells shaded by their share of the true class."""
    n = len(confusion)
    if n > MAX_MATRIX_CLASSES:
        return f'<p class="meta">{n} classes: the matrix is in report.json (targets.NAME.metrics.confusion)</p>'
    names = [html.escape(classes[i] if i < len(classes) else str(i)) for i in range(n)]
    out = ['<table class="confusion"><tr><th>true \\ predicted</th>' + "".join(f"<th>{c}</th>" for c in names) + "</tr>"]
    for i in range(n):
        total = sum(confusion[i]) or 1
        cells = []
        for j in range(n):
            v = confusion[i][j]
            share = v / total
            color = f"rgba(31,119,180,{0.5 * share:.2f})" if i == j else f"rgba(214,39,40,{0.6 * share:.2f})"
            cells.append(f'<td class="num" style="background:{color}">{v}</td>')
        out.append(f"<tr><th>{names[i]}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def slower_notes(report: dict) -> dict[str, str]:
    """For each measured artifact that another measured artifact of the same runtime beats on
    p50 latency by more than 10% with at least its accuracy: what it loses to."""
    measured = {n: t for n, t in (report.get("targets") or {}).items() if (t.get("metrics") or {}).get("status") == "measured"}
    notes = {}
    for name, t in measured.items():
        m = t["metrics"]
        rt = (m.get("settings") or {}).get("runtime") or t["profile"].get("runtime")
        better = [(o, ot["metrics"]) for o, ot in measured.items() if o != name
                  and ((ot["metrics"].get("settings") or {}).get("runtime") or ot["profile"].get("runtime")) == rt
                  and ot["metrics"]["latency_p50_ms"] * SLOWER_MARGIN < m["latency_p50_ms"] and ot["metrics"]["accuracy"] >= m["accuracy"]]
        if better:
            o, om = min(better, key=lambda b: b[1]["latency_p50_ms"])
            notes[name] = (f"slower than {o} on this host (p50 {m['latency_p50_ms']:.3f} ms vs {om['latency_p50_ms']:.3f} ms) "
                           f"with no accuracy gained ({m['accuracy']:.4f} vs {om['accuracy']:.4f})")
    return notes
