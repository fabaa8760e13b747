"""Render report data to one self-contained HTML file: inlined CSS, inline SVG charts, no URLs fetched.

The template ships inside the package (reports/templates/); charts come from the registry in
reports/charts.py, so the page needs no JavaScript library and works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from reports import charts
from reports.gate import anchor

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def render(data: dict[str, Any]) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["bytes"] = charts.fmt_bytes
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    env.globals["anchor"] = anchor
    drawn = {section: [Markup(svg) for svg in svgs] for section, svgs in charts.draw(data).items()}
    css = (TEMPLATES / "report.css").read_text()
    return env.get_template("report.html.j2").render(d=data, css=Markup(css), charts=drawn,
                                                     colors=charts.VERDICT_COLORS)
