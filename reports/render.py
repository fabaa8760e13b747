"""Render report data to one self-contained HTML file: inlined CSS, inline SVG charts, no URLs fetched.

The template ships inside the package (reports/templates/); charts are drawn here as SVG strings so
the page needs no JavaScript library and works offline.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from reports import charts

TEMPLATES = Path(__file__).resolve().parent / "templates"
_COLORS = {"promote": "#1a7f37", "reject": "#cf222e", "inconclusive": "#9a6700", None: "#57606a"}


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


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
        color = _COLORS.get(p.get("verdict"), "#0969da") if p["name"] != "bf16" else "#0969da"
        parts.append(f"<circle cx='{sx(p['x']):.1f}' cy='{sy(p['y']):.1f}' r='6' fill='{color}'/>"
                     f"<text x='{sx(p['x']) + 9:.1f}' y='{sy(p['y']) - 8:.1f}' class='lbl'>"
                     f"{html.escape(p['name'])}</text>")
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(rows: list[tuple[str, float | None, str]], unit_fmt=_fmt_bytes, width: int = 560) -> str:  # noqa: ANN001
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


def _charts(data: dict[str, Any]) -> dict[str, Any]:
    task = _primary_task(data)
    points = []
    for v in data["variants"]:
        t = (v["tasks"] or {}).get(task) or {}
        point = (v["bench"] or {}).get("slo_point") or {}
        levels = (v["bench"] or {}).get("levels") or []
        x = point.get("output_tokens_per_s") or (levels[-1].get("output_throughput") if levels else None)
        points.append({"name": v["name"], "x": x, "y": t.get("value"),
                       "verdict": (v["decision"] or {}).get("verdict")})
    mem_rows, disk_rows, split_rows = [], [], []
    for v in data["variants"]:
        mem = (v["bench"] or {}).get("memory") or {}
        peak = mem.get("server_gpu_bytes_peak") or mem.get("server_rss_bytes_peak")
        mem_rows.append((v["name"], peak, "(GPU, server tree)" if mem.get("server_gpu_bytes_peak") else "(host RSS)"))
        disk_rows.append((v["name"], v["bytes_on_disk"], ""))
        seqs = mem.get("max_concurrent_sequences_at_context_len")
        split_rows.append({"name": v["name"], "weights": mem.get("weights_bytes"), "kv": mem.get("kv_cache_bytes"),
                           "note": f"· {seqs:.1f} seqs @ {mem.get('context_len')}" if seqs else ""})
    y_label = task + (" (lower is better)" if not _hib(data, task) else "")
    return {
        "scatter": Markup(scatter_svg(points, "output tokens/s at SLO point (or highest level)", y_label)),
        "memory": Markup(bars_svg(mem_rows)),
        "disk": Markup(bars_svg(disk_rows)),
        "memory_split": Markup(charts.stacked_bars_svg(split_rows, [("weights", "weights", "#0969da"),
                                                                    ("kv", "KV cache", "#54aeff")], _fmt_bytes,
                                                         "bytes, from vLLM's start-up accounting")),
        "forest": {t: Markup(svg) for t, svg in _forests(data).items()},
        **{k: Markup(svg) for k, svg in _latency(data).items()},
        **{k: Markup(svg) for k, svg in _depth(data).items()},
    }


def _forests(data: dict[str, Any]) -> dict[str, str]:
    """Per task, the verdict's own (family-wise) intervals against the margin, coloured by outcome."""
    out: dict[str, str] = {}
    tasks = {c["name"].split(":", 1)[1] for d in data["verdict"]["variants"].values() for c in d["checks"]
             if c["name"].startswith("quality:") and "ci_low" in c.get("numbers", {})}
    for task in sorted(tasks):
        rows, margin, hib = [], None, True
        for name, dec in data["verdict"]["variants"].items():
            c = next((c for c in dec["checks"] if c["name"] == f"quality:{task}"), None)
            if c is None or "ci_low" not in c["numbers"]:
                continue
            n = c["numbers"]
            rows.append({"name": name, "delta": n["delta"], "ci_low": n["ci_low"], "ci_high": n["ci_high"],
                         "outcome": c["outcome"]})
            margin, hib = n.get("margin"), bool(n.get("higher_is_better", True))
        out[task] = charts.forest_svg(rows, margin=margin, higher_is_better=hib, metric=task)
    return out


def _latency(data: dict[str, Any]) -> dict[str, str]:
    """Output tok/s against ITL p95 and TTFT p95 across concurrency, one curve per variant, SLO marked."""
    itl, ttft, slo = [], [], {}
    for v in data["variants"]:
        b = v["bench"] or {}
        levels = b.get("levels") or []
        slo = b.get("slo") or slo
        point = b.get("slo_point") or {}
        at = next((lv for lv in levels if lv.get("concurrency") == point.get("concurrency")), None)
        itl.append({"name": v["name"], "points": [(lv.get("output_throughput"), lv.get("p95_itl_ms")) for lv in levels],
                    "mark": (at["output_throughput"], at["p95_itl_ms"]) if at else None})
        ttft.append({"name": v["name"], "points": [(lv.get("output_throughput"), lv.get("p95_ttft_ms"))
                                                   for lv in levels],
                     "mark": (at["output_throughput"], at["p95_ttft_ms"]) if at else None})
    ttft_slo = slo.get("ttft_p95_s")
    return {
        "itl_curve": charts.curves_svg(itl, x_label="output tokens/s (each point a concurrency level)",
                                       y_label="ITL p95 ms", hline=slo.get("itl_p95_ms"), hline_label="SLO ITL p95"),
        "ttft_curve": charts.curves_svg(ttft, x_label="output tokens/s (each point a concurrency level)",
                                        y_label="TTFT p95 ms", hline=ttft_slo * 1000 if ttft_slo else None,
                                        hline_label="SLO TTFT p95"),
    }


def _depth(data: dict[str, Any]) -> dict[str, str]:
    """Mean KL and top-1 agreement by context depth, one line per variant."""
    divs = [(v["name"], v["divergence"]) for v in data["variants"]
            if v.get("divergence") and v["divergence"].get("status") == "ok"]
    edges = sorted({(b["depth_from"], b["depth_to"]) for _, d in divs for b in d["by_depth"]})
    cats = [f"{_tokens(a)}–{_tokens(b)}" for a, b in edges]
    kl, top1 = [], []
    for name, d in divs:
        by = {(b["depth_from"], b["depth_to"]): b for b in d["by_depth"]}
        kl.append({"name": name, "points": [(i, by[e]["kl_mean"]) for i, e in enumerate(edges) if e in by]})
        top1.append({"name": name, "points": [(i, by[e]["top1_agreement"]) for i, e in enumerate(edges) if e in by]})
    return {
        "kl_depth": charts.curves_svg(kl, x_label="context depth (tokens before the predicted one)",
                                      y_label="mean KL from bf16, nats", log_y=True, categories=cats),
        "top1_depth": charts.curves_svg(top1, x_label="context depth (tokens before the predicted one)",
                                        y_label="top-1 agreement with bf16", categories=cats),
    }


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)



def evidence_anchor(check: str, variant: str) -> str:
    """Where a verdict row's evidence is in the page: the task's table, the variant's bench, memory, divergence."""
    if check.startswith("quality:") and check.split(":", 1)[1] not in ("serve", "eval", "engine", "tasks"):
        return "#task-" + check.split(":", 1)[1]
    if check.startswith("quality:"):
        return "#quality"
    if check.startswith("performance:"):
        return f"#bench-{variant}"
    return "#memory" if check.startswith("memory:") else "#divergence"


def _primary_task(data: dict[str, Any]) -> str:
    for v in data["variants"]:
        for name, t in (v["tasks"] or {}).items():
            if t.get("status") == "ok":
                return name
    return "quality"


def _hib(data: dict[str, Any], task: str) -> bool:
    for v in data["variants"]:
        t = (v["tasks"] or {}).get(task)
        if t:
            return bool(t.get("higher_is_better", True))
    return True


def render(data: dict[str, Any]) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["bytes"] = _fmt_bytes
    env.filters["num"] = _num
    env.globals["anchor"] = evidence_anchor
    css = (TEMPLATES / "report.css").read_text()
    return env.get_template("report.html.j2").render(d=data, css=Markup(css), charts=_charts(data),
                                                     colors=_COLORS)
