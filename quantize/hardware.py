"""Does the declared target GPU run a recipe's scheme? Checked before any work, with vLLM's own kernel rules
(qgcore.kernels) on the model's real layer shapes, so a checkpoint is never built for a GPU that cannot
serve it; a weight-only fallback is noted and recorded in the manifest."""

from __future__ import annotations

from typing import Any

from qgcore.device import Platform
from qgcore.errors import UnsupportedHardwareError
from qgcore.kernels import check
from quantize.recipe import Recipe
from quantize.schemes import SCHEMES


def check_target(recipe: Recipe, shapes: dict[str, list[int]], model: dict[str, Any],
                 target: Platform | None) -> str | None:
    """None if the target serves it natively, a note if only through a fallback; raises if it cannot."""
    if target is None:
        return None
    planned = SCHEMES[recipe.quant.scheme].summary(recipe)
    sup = check(planned, shapes, model, tp=1, on=target, kv_cache_dtype=recipe.serve.kv_cache_dtype)
    if not sup.ok:
        why = (sup.reason or "").removeprefix(f"{target.label}: ")  # the preflight names the platform too
        raise UnsupportedHardwareError(f"recipe '{recipe.name}' cannot be served on {target.label}: {why}; "
                                       "drop it from RECIPES or pick another TARGET_GPU")
    return None if sup.native else f"served as {sup.served_as}: {sup.reason}"
