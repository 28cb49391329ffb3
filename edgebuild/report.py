"""dist/report.html: one self-contained page (no network) with an inline-SVG chart."""

from __future__ import annotations

import html
import math

from .render import render
from .report_sections import accuracy_axis, curves_svg, matrix_html, per_class

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _points(report: dict) -> list[dict]:
    pts = []
    for row in report.get("stages") or []:
        if row.get("stage") in ("transfer", "prune") and row.get("host_latency_p50_ms") and row.get("val_accuracy") is not None:
            label = "fp32 reference (PyTorch)" if row["stage"] == "transfer" else f"pruned reference (PyTorch, {row.get('target')})"
            pts.append({"label": label, "x": row["host_latency_p50_ms"], "y": row["val_accuracy"], "kind": "reference"})
    for name, t in (report.get("targets") or {}).items():
        m = t.get("metrics") or {}
        if m.get("status") == "measured":
            prec = (t.get("precision") or {}).get("effective") or t["profile"].get("precision")
            pts.append({"label": f"{name} ({prec})", "x": m["latency_p50_ms"], "y": m["accuracy"], "kind": "artifact"})
    return pts


def chart_svg(report: dict, width: int = 720, height: int = 360) -> str:
    """Accuracy (y) against p50 latency (x, log scale) of every measured artifact and the
    PyTorch references. Pure SVG text, no scripts."""
    pts = _points(report)
    if not pts:
        return '<p class="notrun">no measured artifact to chart</p>'
    left, right, top, bottom = 60, 250, 20, 50
    pw, ph = width - left - right, height - top - bottom
    xs = [math.log10(max(p["x"], 1e-6)) for p in pts]
    ys = [p["y"] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 - x0 < 0.2:
        x0, x1 = x0 - 0.1, x1 + 0.1
    pad = (x1 - x0) * 0.08
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = accuracy_axis(ys)  # at least 10 points tall: 2 points apart must not look huge

    def sx(v):
        return left + (math.log10(max(v, 1e-6)) - x0) / (x1 - x0) * pw

    def sy(v):
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="accuracy versus latency">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    # x ticks at 1-2-5 steps
    for e in range(math.floor(x0), math.ceil(x1) + 1):
        for mult in (1, 2, 5):
            v = mult * 10**e
            lv = math.log10(v)
            if x0 <= lv <= x1:
                X = sx(v)
                out.append(f'<line x1="{X:.1f}" y1="{top}" x2="{X:.1f}" y2="{top + ph}" stroke="#e3e3e3"/>')
                out.append(f'<text x="{X:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{v:g}</text>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        Y = sy(v)
        out.append(f'<line x1="{left}" y1="{Y:.1f}" x2="{left + pw}" y2="{Y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 6}" y="{Y + 4:.1f}" font-size="11" text-anchor="end">{v:.3f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" font-size="12" text-anchor="middle">latency p50, ms (log scale, batch 1, build host)</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">val accuracy</text>')
    for i, p in enumerate(pts):
        color = PALETTE[i % len(PALETTE)]
        X, Y = sx(p["x"]), sy(p["y"])
        title = html.escape(f"{p['label']}: accuracy {p['y']:.4f}, p50 {p['x']:.3f} ms")
        if p["kind"] == "reference":
            out.append(f'<rect x="{X - 5:.1f}" y="{Y - 5:.1f}" width="10" height="10" fill="none" stroke="{color}" stroke-width="2"><title>{title}</title></rect>')
        else:
            out.append(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="5" fill="{color}"><title>{title}</title></circle>')
        ly = top + 14 + i * 18
        marker = (f'<rect x="{left + pw + 12}" y="{ly - 9}" width="10" height="10" fill="none" stroke="{color}" stroke-width="2"/>' if p["kind"] == "reference"
                  else f'<circle cx="{left + pw + 17}" cy="{ly - 4}" r="5" fill="{color}"/>')
        out.append(marker)
        out.append(f'<text x="{left + pw + 28}" y="{ly}" font-size="11">{html.escape(p["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(report: dict) -> str:
    search = [(g, search_svg(g)) for g in ((report.get("search") or {}).get("groups") or [])]
    classes = report.get("classes") or []
    per_artifact = []
    for name, t in (report.get("targets") or {}).items():
        m = t.get("metrics") or {}
        for split, conf in (("val", m.get("confusion")), ("test", m.get("test_confusion"))):
            if conf:
                per_artifact.append({"target": name, "split": split, "rows": per_class(conf, classes), "matrix": matrix_html(conf, classes)})
    return render("report.html.j2", report=report, chart=chart_svg(report), search=search,
                  curves=curves_svg(report.get("curves") or {}), per_artifact=per_artifact)


def search_svg(group: dict, width: int = 720, height: int = 320) -> str:
    """One search group's candidates: p50 latency (x, log) against accuracy (final where the
    candidate had full recovery, else proxy). Pareto-front points in colour, dominated ones grey,
    the chosen one ringed."""
    rows = [r for r in group.get("candidates") or [] if not r.get("failed")]
    if not rows:
        return '<p class="notrun">no candidate measured</p>'
    acc = [r["final_accuracy"] if r.get("final_accuracy") is not None else r["proxy_accuracy"] for r in rows]
    lx = [math.log10(max(r["p50_ms"], 1e-6)) for r in rows]
    x0, x1 = min(lx), max(lx)
    x0, x1 = (x0 - 0.1, x1 + 0.1) if x1 - x0 < 0.2 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = min(acc), max(acc)
    y0, y1 = accuracy_axis(acc)
    left, top, pw, ph = 60, 15, width - 80, height - 60
    sx = lambda v: left + (math.log10(max(v, 1e-6)) - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda v: top + (1 - (v - y0) / (y1 - y0)) * ph  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="search candidates">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
           f'<text x="{left + pw / 2}" y="{height - 12}" font-size="12" text-anchor="middle">latency p50, ms (log scale; {html.escape(str(group["profile"].get("runtime")))}, '
           f'{group["profile"].get("threads") or "default"} threads, batch {group["profile"].get("batch")})</text>',
           f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">accuracy</text>']
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" font-size="11" text-anchor="end">{v:.3f}</text>')
    for e in range(math.floor(x0), math.ceil(x1) + 1):
        for mult in (1, 2, 5):
            v = mult * 10**e
            if x0 <= math.log10(v) <= x1:
                out.append(f'<text x="{sx(v):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{v:g}</text>')
    for r, a in sorted(zip(rows, acc), key=lambda t: t[0].get("pareto", False)):
        X, Y = sx(r["p50_ms"]), sy(a)
        kind = "final" if r.get("final_accuracy") is not None else "proxy"
        title = html.escape(f"{r['label']}: {kind} accuracy {a:.4f}, p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, {r['size_bytes'] / 1000:.1f} kB"
                            + ("" if r.get("latency_source") == "measured" else f" ({r.get('latency_source')})"))
        color = "#1f77b4" if r.get("pareto") else "#bbbbbb"
        out.append(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="5" fill="{color}" class="{"front" if r.get("pareto") else "dominated"}"><title>{title}</title></circle>')
        if r.get("chosen"):
            out.append(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="9" fill="none" stroke="#d62728" stroke-width="2" class="chosen"/>')
            out.append(f'<text x="{X + 12:.1f}" y="{Y - 8:.1f}" font-size="11" fill="#d62728">chosen: {html.escape(r["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out)
