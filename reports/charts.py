"""Inline SVG charts for the report: primitives (forest plot, curves, bars) and the registry of the charts
the report draws. Strings only, no JavaScript, no fonts or scripts fetched, so the one HTML file works
offline. Every chart takes plain numbers (report data) and says so in its own words when it has none.

Adding a chart is one `@chart(name, section)` function here returning SVG per section anchor; the
template draws whatever is registered for a section, and the Chromium test walks the registry.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OUTCOME_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "skipped": "#57606a"}
VERDICT_COLORS = {"promote": "#1a7f37", "reject": "#cf222e", "inconclusive": "#9a6700", None: "#57606a"}
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


def _frame(width: int, height: int, label: str) -> list[str]:
    return [f"<svg class='chart' role='img' aria-label='{_esc(label)}' viewBox='0 0 {width} {height}' "
            f"width='{width}' height='{height}' data-chart='{_esc(label)}'>"]


def forest_svg(rows: list[dict[str, Any]], *, margin: float | None, higher_is_better: bool, metric: str,
               width: int = 620, reference: str = "the reference") -> str:
    """Per variant: delta vs the reference with its CI, against the non-inferiority margin line, coloured by
    outcome."""
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
    out = _frame(width, height, f"forest plot {metric}")
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
               f"{_esc(metric)}: variant − {_esc(reference)} ({direction})</text></svg>")
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
    y0, y1 = y0 - ypad, y1 + ypad
    if not log_y and min(p[1] for p in pts) >= 0:
        y0 = max(y0, 0.0)
    sx, sy = _scale(x0, x1, left, width - right), _scale(y0, y1, height - bottom, top)
    out = _frame(width, height, f"{y_label} vs {x_label}")
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
    out = _frame(width, height, "stacked bars " + " + ".join(lbl for _, lbl, _ in parts))
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


def scatter_svg(points: list[dict[str, Any]], x_label: str, y_label: str, width: int = 560, height: int = 320) -> str:
    """Quality (y) vs throughput (x), one labelled dot per variant."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    if not pts:
        return "<p class='muted'>No variant has both a quality score and a throughput measurement.</p>"
    pad = 56
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    x0, x1 = min(xs) * 0.9, max(xs) * 1.1 or 1
    y_span = (max(ys) - min(ys)) or abs(max(ys)) * 0.1 or 1
    y0, y1 = min(ys) - 0.15 * y_span, max(ys) + 0.15 * y_span

    def sx(v: float) -> float:
        return pad + (v - x0) / ((x1 - x0) or 1) * (width - 2 * pad)

    def sy(v: float) -> float:
        return height - pad - (v - y0) / ((y1 - y0) or 1) * (height - 2 * pad)

    parts = [f"<svg role='img' aria-label='quality versus throughput' viewBox='0 0 {width} {height}' "
             f"width='{width}' height='{height}'>",
             f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#8c959f'/>",
             f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' stroke='#8c959f'/>",
             f"<text x='{width / 2}' y='{height - 14}' text-anchor='middle' class='axis'>{html.escape(x_label)}</text>",
             f"<text x='16' y='{height / 2}' text-anchor='middle' class='axis' "
             f"transform='rotate(-90 16 {height / 2})'>{html.escape(y_label)}</text>"]
    for v, anchor in ((x0, "start"), (x1, "end")):
        parts.append(f"<text x='{sx(v)}' y='{height - pad + 16}' text-anchor='{anchor}' class='tick'>{v:.1f}</text>")
    for v in (y0, y1):
        parts.append(f"<text x='{pad - 6}' y='{sy(v) + 4}' text-anchor='end' class='tick'>{v:.3f}</text>")
    for p in pts:
        color = VERDICT_COLORS.get(p.get("verdict"), "#0969da") if not p.get("reference") else "#0969da"
        parts.append(f"<circle cx='{sx(p['x']):.1f}' cy='{sy(p['y']):.1f}' r='6' fill='{color}'/>"
                     f"<text x='{sx(p['x']) + 9:.1f}' y='{sy(p['y']) - 8:.1f}' class='lbl'>"
                     f"{html.escape(p['name'])}</text>")
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(rows: list[tuple[str, float | None, str]], unit_fmt: Callable[[float | None], str],
             width: int = 560) -> str:
    """Horizontal bars: (label, value, note)."""
    vals = [v for _, v, _ in rows if v]
    if not vals:
        return "<p class='muted'>No measurement.</p>"
    top, bar_h, pad_l = max(vals), 22, 90
    height = len(rows) * (bar_h + 8) + 8
    parts = [f"<svg role='img' aria-label='bars' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
             ">"]
    for i, (label, v, note) in enumerate(rows):
        y = 8 + i * (bar_h + 8)
        w = (v or 0) / top * (width - pad_l - 150)
        parts.append(f"<text x='{pad_l - 8}' y='{y + 15}' text-anchor='end' class='lbl'>{html.escape(label)}</text>"
                     f"<rect x='{pad_l}' y='{y}' width='{w:.1f}' height='{bar_h}' fill='#54aeff'/>"
                     f"<text x='{pad_l + w + 6:.1f}' y='{y + 15}' class='tick'>{html.escape(unit_fmt(v))} "
                     f"{html.escape(note)}</text>")
    parts.append("</svg>")
    return "".join(parts)


# ---- the registry: what the report draws, per section anchor ---------------------------------------------

@dataclass(frozen=True)
class Chart:
    name: str
    build: Callable[[dict[str, Any]], dict[str, str]]  # report data -> {section anchor: svg}



CHARTS: dict[str, Chart] = {}


Builder = Callable[[dict[str, Any]], dict[str, str]]


def chart(name: str) -> Callable[[Builder], Builder]:
    """Register a chart: a function from report data to SVG for one or more report sections."""
    def register(fn: Builder) -> Builder:
        CHARTS[name] = Chart(name, fn)
        return fn
    return register


def draw(data: dict[str, Any]) -> dict[str, list[str]]:
    """Every registered chart, grouped by the section it belongs to (in registration order)."""
    out: dict[str, list[str]] = {}
    for c in CHARTS.values():
        for section, svg in c.build(data).items():
            out.setdefault(section, []).append(svg)
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@chart("forest")
def _forests(data: dict[str, Any]) -> dict[str, str]:
    """Per task, the verdict's own intervals (at each variant's Holm level) against the margin."""
    out: dict[str, str] = {}
    tasks = sorted({c["name"].split(":", 1)[1] for d in data["verdict"]["variants"].values() for c in d["checks"]
                    if c["name"].startswith("quality:") and "ci_low" in c.get("numbers", {})})
    for task in tasks:
        rows, margin, hib = [], None, True
        for name, dec in data["verdict"]["variants"].items():
            c = next((c for c in dec["checks"] if c["name"] == f"quality:{task}"), None)
            if c is None or "ci_low" not in c["numbers"]:
                continue
            n = c["numbers"]
            rows.append({"name": name, "delta": n["delta"], "ci_low": n["ci_low"], "ci_high": n["ci_high"],
                         "outcome": c["outcome"]})
            margin, hib = n.get("margin"), bool(n.get("higher_is_better", True))
        out[f"task-{task}"] = forest_svg(rows, margin=margin, higher_is_better=hib, metric=task,
                                         reference=data.get("reference", "the reference"))
    return out


@chart("throughput")
def _throughput(data: dict[str, Any]) -> dict[str, str]:
    """Output tok/s over the reference's at the same load, from interleaved pairs, against the check's floor."""
    rows, margin = [], None
    for name, dec in data["verdict"]["variants"].items():
        c = next((c for c in dec["checks"] if c["name"] == "performance:throughput"), None)
        n = (c or {}).get("numbers") or {}
        if "low" not in n:
            continue
        rows.append({"name": name, "delta": n["ratio"] - 1, "ci_low": n["low"] - 1, "ci_high": n["high"] - 1,
                     "outcome": c["outcome"]})  # type: ignore[index]
        margin = 1 - n["floor"]
    return {"throughput": forest_svg(rows, margin=margin, higher_is_better=True, metric="output tok/s ratio − 1",
                                     reference=data.get("reference", "the reference"))}


def _line(series: dict[str, Any], key: str, label: str, t0: float, scale: float = 1.0) -> dict[str, Any]:
    # a level with no samples in its window is recorded as None (Prometheus' NaN): a gap, not a point
    return {"name": label, "points": [(t - t0, val * scale) for t, val in series.get(key) or [] if val is not None]}


@chart("prometheus")
def _prometheus(data: dict[str, Any]) -> dict[str, str]:
    """Per variant, what the bench's Prometheus recorded over the sweep: queue time p95 and KV-cache
    occupancy, by the same PromQL the deploy kit's scaler runs (the queries are printed under the chart)."""
    out = {}
    for v in data["variants"]:
        prom = (v["bench"] or {}).get("prometheus") or {}
        series = prom.get("series") or {}
        if not series:
            continue
        t0 = min((p[0] for s in series.values() for p in s), default=0.0)
        queue = _line(series, "queue_time_p95_s", "queue time p95", t0)
        kv = _line(series, "kv_cache_usage", "KV cache occupancy", t0, 100)
        waiting = _line(series, "waiting", "requests waiting", t0)
        out[f"prom-{v['name']}"] = (
            curves_svg([queue], x_label="seconds into the sweep", y_label="queue time p95, s")
            + curves_svg([kv, waiting], x_label="seconds into the sweep", y_label="KV occupancy % / requests waiting"))
    return out


def _primary_task(data: dict[str, Any]) -> tuple[str, bool]:
    for v in data["variants"]:
        for name, t in (v["tasks"] or {}).items():
            if t.get("status") == "scored":
                return name, bool(t.get("higher_is_better", True))
    return "quality", True


@chart("quality-vs-throughput")
def _scatter(data: dict[str, Any]) -> dict[str, str]:
    task, hib = _primary_task(data)
    points = []
    for v in data["variants"]:
        t = (v["tasks"] or {}).get(task) or {}
        cap = (v["bench"] or {}).get("capacity") or {}
        points.append({"name": v["name"], "x": cap.get("output_tokens_per_s"), "y": t.get("value"),
                       "reference": v["is_reference"], "verdict": (v["decision"] or {}).get("verdict")})
    label = task + ("" if hib else " (lower is better)")
    return {"quality-vs-throughput": scatter_svg(points, "output tokens/s at capacity", label)}


@chart("latency")
def _latency(data: dict[str, Any]) -> dict[str, str]:
    """Output tok/s against ITL p95 and TTFT p95 across the sweep's loads, one curve per variant, SLO marked,
    the capacity ringed."""
    itl, ttft, slo = [], [], {}
    for v in data["variants"]:
        b = v["bench"] or {}
        levels = [lv for lv in b.get("levels") or [] if lv.get("workload", "random") == "random"]
        slo = b.get("slo") or slo
        cap = b.get("capacity") or {}
        at = next((lv for lv in levels if lv.get("load") == cap.get("load") and not lv.get("warmup")), None)
        pts = sorted(((lv.get("output_throughput"), lv) for lv in levels if not lv.get("warmup")),
                     key=lambda p: p[0] or 0)
        itl.append({"name": v["name"], "points": [(x, lv.get("p95_itl_ms")) for x, lv in pts],
                    "mark": (at["output_throughput"], at["p95_itl_ms"]) if at else None})
        ttft.append({"name": v["name"], "points": [(x, lv.get("p95_ttft_ms")) for x, lv in pts],
                     "mark": (at["output_throughput"], at["p95_ttft_ms"]) if at else None})
    ttft_slo = slo.get("ttft_p95_s")
    return {"latency": curves_svg(itl, x_label="output tokens/s (each point a load level)", y_label="ITL p95 ms",
                                  hline=slo.get("itl_p95_ms"), hline_label="SLO ITL p95")
            + curves_svg(ttft, x_label="output tokens/s (each point a load level)", y_label="TTFT p95 ms",
                         hline=ttft_slo * 1000 if ttft_slo else None, hline_label="SLO TTFT p95")}


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


@chart("divergence-by-depth")
def _depth(data: dict[str, Any]) -> dict[str, str]:
    """Mean KL and top-1 agreement by context depth, one line per variant."""
    divs = [(v["name"], v["divergence"]) for v in data["variants"]
            if v.get("divergence") and v["divergence"].get("status") == "measured"]
    edges = sorted({(b["depth_from"], b["depth_to"]) for _, d in divs for b in d["by_depth"]})
    cats = [f"{_tokens(a)}–{_tokens(b)}" for a, b in edges]
    kl, top1 = [], []
    for name, d in divs:
        by = {(b["depth_from"], b["depth_to"]): b for b in d["by_depth"]}
        kl.append({"name": name, "points": [(i, by[e]["kl_mean"]) for i, e in enumerate(edges) if e in by]})
        top1.append({"name": name, "points": [(i, by[e]["top1_agreement"]) for i, e in enumerate(edges) if e in by]})
    ref = data.get("reference", "the reference")
    return {"divergence": curves_svg(kl, x_label="context depth (tokens before the predicted one)",
                                     y_label=f"mean KL from {ref}, nats", log_y=True, categories=cats)
            + curves_svg(top1, x_label="context depth (tokens before the predicted one)",
                         y_label=f"top-1 agreement with {ref}", categories=cats)}


@chart("memory")
def _memory(data: dict[str, Any]) -> dict[str, str]:
    """Weights vs KV cache (vLLM's own accounting) per variant, and the measured peaks."""
    split, peak, disk = [], [], []
    for v in data["variants"]:
        mem = (v["bench"] or {}).get("memory") or {}
        seqs = mem.get("max_concurrent_sequences_at_context_len")
        split.append({"name": v["name"], "weights": mem.get("weights_bytes"), "kv": mem.get("kv_cache_bytes"),
                      "note": f"· {seqs:.1f} seqs @ {mem.get('context_len')}" if seqs else ""})
        measured = mem.get("server_gpu_reserved_bytes_peak") or mem.get("server_rss_bytes_peak")
        peak.append((v["name"], measured, "(GPU reservation, NVML)" if mem.get("server_gpu_reserved_bytes_peak")
                     else "(host RSS)"))
        disk.append((v["name"], v["bytes_on_disk"], ""))
    return {"memory": stacked_bars_svg(split, [("weights", "weights", "#0969da"), ("kv", "KV cache", "#54aeff")],
                                       fmt_bytes, "bytes, from vLLM's start-up accounting"),
            "memory-peak": bars_svg(peak, fmt_bytes), "disk": bars_svg(disk, fmt_bytes)}
