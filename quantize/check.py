"""Pre-flight: every check that needs no calibration, run for all recipes before the first one starts."""

from __future__ import annotations

from qgcore.device import Platform
from quantize.hardware import check_target
from quantize.model import Layout, ResolvedModel, layout, resolve_model
from quantize.recipe import Recipe
from quantize.run import check_group_size


def preflight(model: str | None, recipes: list[Recipe], target: Platform | None) -> tuple[ResolvedModel, Layout]:
    resolved = resolve_model(model)
    found = layout(resolved.path)
    for recipe in recipes:
        check_group_size(recipe, found.widths)
        check_target(recipe, found.shapes, found.config, target)
    return resolved, found
