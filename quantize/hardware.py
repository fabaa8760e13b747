"""Does the declared target GPU run a recipe's scheme? Checked before any work, from the recipe alone."""

from __future__ import annotations

from qgcore.errors import ConfigError, UnsupportedHardwareError, did_you_mean
from quantize.recipe import Recipe

# CUDA compute capability of the GPUs people serve on (NVIDIA's published table).
GPU_COMPUTE_CAPABILITY = {
    "T4": 7.5, "V100": 7.0, "A10": 8.6, "A10G": 8.6, "A40": 8.6, "A100": 8.0, "A6000": 8.6,
    "L4": 8.9, "L40": 8.9, "L40S": 8.9, "RTX4090": 8.9, "H100": 9.0, "H200": 9.0, "GH200": 9.0,
    "B200": 10.0, "GB200": 10.0, "B300": 10.3, "RTX5090": 12.0,
}


def parse_target(target: str | None) -> float | None:
    """`H100` or `9.0` -> 9.0; None -> no check."""
    if not target:
        return None
    try:
        return float(target)
    except ValueError:
        pass
    key = target.upper().replace("-", "").replace(" ", "")
    if key not in GPU_COMPUTE_CAPABILITY:
        raise ConfigError(did_you_mean(target, list(GPU_COMPUTE_CAPABILITY), "target GPU") +
                          " (or give a compute capability such as 8.9)")
    return GPU_COMPUTE_CAPABILITY[key]


def check_target(recipe: Recipe, target_cc: float | None) -> str | None:
    """None if native, a note if it runs only via fallback; raises if the target cannot run it at all."""
    hw = recipe.hardware
    if target_cc is None or hw.min_compute_capability is None or target_cc >= hw.min_compute_capability:
        return None
    if hw.fallback_min_compute_capability is not None and target_cc >= hw.fallback_min_compute_capability:
        return hw.fallback_note or f"runs via fallback below compute capability {hw.min_compute_capability}"
    need = hw.fallback_min_compute_capability or hw.min_compute_capability
    raise UnsupportedHardwareError(
        f"recipe '{recipe.name}' needs compute capability >= {need} (target has {target_cc}); "
        "drop it from RECIPES or pick a newer TARGET_GPU"
    )
