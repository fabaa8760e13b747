"""Inline SVG charts for the report: forest plot, curves, stacked bars. Strings only, no JavaScript, no fonts
or scripts fetched, so the one HTML file works offline. Every chart takes plain numbers (report data) and
says so in its own words when it has none."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

OUTCOME_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "skipped": "#57606a"}
SERIES_COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#57606a"]


def _esc(x: object) -> str:
    return html.escape(str(x))


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2g}" if a < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def _frame(width: int, height: int, label: str, pad: tuple[int, int, int, int]) -> list[str]:
    return [f"<svg class='chart' role='img' aria-label='{_esc(label)}' viewBox='0 0 {width} {height}' "
            f"width='{width}' height='{height}' data-chart='{_esc(label)}'>"]


def forest_svg(rows: list[dict[str, Any]], *, margin: float | None, higher_is_better: bool, metric: str,
               width: int = 620) -> str:
    """Per variant: delta vs bf16 with its CI, against the non-inferiority margin line, coloured by outcome."""
    rows = [r for r in rows if r.get("ci_low") is not None and r.get("ci_high") is not None]
    if not rows:
        return "<p class='muted'>No paired comparison to plot.</p>"
    left, right, top, row_h = 110, 30, 26, 26
    height = top + row_h * len(rows) + 46
    edge = -margin if (margin is not None and higher_is_better) else margin
    vals = [r["ci_low"] for r in rows] + [r["ci_high"] for r in rows] + [0.0] + ([edge] if edge is not None else [])
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.08 or 0.01
    sx = _scale(lo - pad, hi + pad, left, width - right)
    out = _frame(width, height, f"forest plot {metric}", (top, right, 46, left))
    base = top + row_h * len(rows)
    for t in _ticks(lo - pad, hi + pad):
        out.append(f"<line x1='{sx(t):.1f}' y1='{top - 6}' x2='{sx(t):.1f}' y2='{base}' stroke='#eaeef2'/>"
                   f"<text x='{sx(t):.1f}' y='{base + 14}' text-anchor='middle' class='tick'>{_fmt(t)}</text>")
    out.append(f"<line x1='{sx(0):.1f}' y1='{top - 8}' x2='{sx(0):.1f}' y2='{base}' stroke='#57606a'/>")
    if edge is not None:
        out.append(f"<line class='margin-line' x1='{sx(edge):.1f}' y1='{top - 8}' x2='{sx(edge):.1f}' y2='{base}' "
                   f"stroke='#cf222e' stroke-dasharray='5 3'/><text x='{sx(edge):.1f}' y='{top - 12}' "
                   f"text-anchor='middle' class='tick'>{'−' if higher_is_better else '+'}margin "
                   f"{_fmt(margin or 0)}</text>")
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        c = OUTCOME_COLORS.get(r.get("outcome", ""), "#0969da")
        out.append(f"<text x='{left - 8}' y='{y + 4:.1f}' text-anchor='end' class='lbl'>{_esc(r['name'])}</text>"
                   f"<path class='ci' d='M{sx(r['ci_low']):.1f},{y:.1f}H{sx(r['ci_high']):.1f}' stroke='{c}' "
                   f"stroke-width='3'/><circle cx='{sx(r['delta']):.1f}' cy='{y:.1f}' r='5' fill='{c}'>"
                   f"<title>{_esc(r['name'])}: {r['delta']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
                   f"{_esc(r.get('outcome', ''))}</title></circle>")
    direction = "higher is better" if higher_is_better else "lower is better"
    out.append(f"<text x='{(left + width - right) / 2:.0f}' y='{height - 8}' text-anchor='middle' class='axis'>"
               f"{_esc(metric)}: variant − bf16 ({direction})</text></svg>")
    return "".join(out)


def curves_svg(series: list[dict[str, Any]], *, x_label: str, y_label: str, hline: float | None = None,
               hline_label: str = "", log_y: bool = False, categories: list[str] | None = None,
               width: int = 560, height: int = 300) -> str:
    """Lines with points: series = [{name, points: [(x, y)], mark: (x, y) or None}]. `categories` makes x an
    index into those labels (depth buckets); `hline` draws a threshold (the SLO)."""
    pts = [(x, y) for s in series for x, y in s["points"] if y is not None and x is not None]
    if not pts:
        return "<p class='muted'>No measurements to plot.</p>"
    left, right, top, bottom = 64, 120, 16, 46

    def ty(v: float) -> float:
        return math.log10(max(v, 1e-6)) if log_y else v

    xs, ys = [p[0] for p in pts], [ty(p[1]) for p in pts] + ([ty(hline)] if hline is not None else [])
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    ypad = (y1 - y0) * 0.1 or (abs(y1) * 0.1 or 1)
    y0, y1 = (y0 - ypad, y1 + ypad) if not log_y else (y0 - ypad, y1 + ypad)
    if not log_y and min(p[1] for p in pts) >= 0:
        y0 = max(y0, 0.0)
    sx, sy = _scale(x0, x1, left, width - right), _scale(y0, y1, height - bottom, top)
    out = _frame(width, height, f"{y_label} vs {x_label}", (top, right, bottom, left))
    out.append(f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' "
               f"stroke='#8c959f'/><line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#8c959f'/>")
    xt = list(range(len(categories))) if categories else _ticks(x0, x1)
    for t in xt:
        lbl = categories[int(t)] if categories else _fmt(t)
        out.append(f"<text x='{sx(t):.1f}' y='{height - bottom + 15}' text-anchor='middle' class='tick'>"
                   f"{_esc(lbl)}</text>")
    for t in _ticks(y0, y1, 4):
        lbl = _fmt(10 ** t) if log_y else _fmt(t)
        out.append(f"<line x1='{left}' y1='{sy(t):.1f}' x2='{width - right}' y2='{sy(t):.1f}' stroke='#eaeef2'/>"
                   f"<text x='{left - 6}' y='{sy(t) + 4:.1f}' text-anchor='end' class='tick'>{lbl}</text>")
    if hline is not None:
        out.append(f"<line class='slo-line' x1='{left}' y1='{sy(ty(hline)):.1f}' x2='{width - right}' "
                   f"y2='{sy(ty(hline)):.1f}' stroke='#cf222e' stroke-dasharray='5 3'/><text x='{width - right + 4}' "
                   f"y='{sy(ty(hline)) + 4:.1f}' class='tick'>{_esc(hline_label)}</text>")
    for i, s in enumerate(series):
        c = SERIES_COLORS[i % len(SERIES_COLORS)]
        good = [(x, y) for x, y in s["points"] if y is not None and x is not None]
        if not good:
            continue
        d = "M" + "L".join(f"{sx(x):.1f},{sy(ty(y)):.1f}" for x, y in good)
        out.append(f"<path class='series' d='{d}' fill='none' stroke='{c}' stroke-width='2'/>")
        for x, y in good:
            out.append(f"<circle cx='{sx(x):.1f}' cy='{sy(ty(y)):.1f}' r='3.5' fill='{c}'><title>{_esc(s['name'])}: "
                       f"{_fmt(x) if not categories else categories[int(x)]}, {_fmt(y)}</title></circle>")
        if s.get("mark"):
            mx, my = s["mark"]
            out.append(f"<circle class='slo-point' cx='{sx(mx):.1f}' cy='{sy(ty(my)):.1f}' r='8' fill='none' "
                       f"stroke='{c}' stroke-width='2'/>")
        lx, ly = good[-1]
        out.append(f"<text x='{sx(lx) + 8:.1f}' y='{sy(ty(ly)) + 4:.1f}' class='lbl' fill='{c}'>"
                   f"{_esc(s['name'])}</text>")
    out.append(f"<text x='{(left + width - right) / 2:.0f}' y='{height - 8}' text-anchor='middle' class='axis'>"
               f"{_esc(x_label)}</text><text x='14' y='{(top + height - bottom) / 2:.0f}' text-anchor='middle' "
               f"class='axis' transform='rotate(-90 14 {(top + height - bottom) / 2:.0f})'>{_esc(y_label)}"
               f"{' (log)' if log_y else ''}</text></svg>")
    return "".join(out)


def stacked_bars_svg(rows: list[dict[str, Any]], parts: list[tuple[str, str, str]],
                     fmt: Callable[[float | None], str], axis_label: str, width: int = 620) -> str:
    """Horizontal stacked bars: rows = [{name, <key>: value, note}], parts = [(key, label, colour)]."""
    if not any(r.get(k) for r in rows for k, _, _ in parts):
        return "<p class='muted'>No measurement.</p>"
    left, bar_h, gap, top = 90, 20, 8, 26
    height = top + len(rows) * (bar_h + gap) + 26
    total = max(sum(r.get(k) or 0 for k, _, _ in parts) for r in rows) or 1
    sx = _scale(0, total, 0, width - left - 190)
    out = _frame(width, height, "stacked bars " + " + ".join(lbl for _, lbl, _ in parts), (top, 0, 0, left))
    x = left
    for _key, lbl, c in parts:
        out.append(f"<rect x='{x}' y='4' width='12' height='12' fill='{c}'/><text x='{x + 16}' y='14' "
                   f"class='tick'>{_esc(lbl)}</text>")
        x += 24 + 7 * len(lbl)
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(f"<text x='{left - 8}' y='{y + 14}' text-anchor='end' class='lbl'>{_esc(r['name'])}</text>")
        x0 = float(left)
        for key, lbl, c in parts:
            w = sx(r.get(key) or 0)
            if w > 0:
                out.append(f"<rect class='bar' x='{x0:.1f}' y='{y}' width='{w:.1f}' height='{bar_h}' fill='{c}'>"
                           f"<title>{_esc(r['name'])} {_esc(lbl)}: {fmt(r.get(key))}</title></rect>")
            x0 += w
        text = " + ".join(fmt(r.get(k)) for k, _, _ in parts if r.get(k))
        out.append(f"<text x='{x0 + 6:.1f}' y='{y + 14}' class='tick'>{_esc(text)} {_esc(r.get('note', ''))}</text>")
    out.append(f"<text x='{left}' y='{height - 8}' class='axis'>{_esc(axis_label)}</text></svg>")
    return "".join(out)
