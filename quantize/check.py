"""Pre-flight: every check that needs no calibration, run for all recipes before the first one starts."""

from __future__ import annotations

from quantize.hardware import check_target
from quantize.model import ResolvedModel, linear_input_widths, resolve_model
from quantize.recipe import Recipe
from quantize.run import check_group_size


def preflight(model: str | None, recipes: list[Recipe], target_cc: float | None) -> tuple[ResolvedModel, dict]:
    for recipe in recipes:
        check_target(recipe, target_cc)
    resolved = resolve_model(model)
    widths = linear_input_widths(resolved.path)
    for recipe in recipes:
        check_group_size(recipe, widths)
    return resolved, widths
