"""The quantize stage over several recipes: pre-flight every input, then build each variant.

Run in a process of its own by `quantgate all` (and a Ray cell's own worker), so llmcompressor's memory
(and, on a GPU, its CUDA cache) is gone before the first vLLM server asks for most of the card.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from qgcore.device import Platform
from qgcore.errors import EXIT_OK, EXIT_PARTIAL, QuantgateError
from quantize.recipe import Recipe, Sizing

log = logging.getLogger("quantgate.quantize")


def run_stage(*, model: str | None, recipes: list[Recipe], run_dir: Path, target: Platform | None = None,
              force: bool = False, sizing: dict[str, int] | None = None) -> int:
    """Quantize `model` with each recipe into `run_dir/<recipe>/`. Returns an exit code.

    Bad input (strict-schema error, group size, target GPU, model not found) raises before any recipe
    starts, so nothing is half done. A recipe that fails at run time is reported and the others still run
    (exit 9). `sizing` (a quantize.recipe.Sizing as a dict: the demo's smaller calibration and AWQ search)
    replaces every calibrated recipe's; it is in each content key and manifest.
    """
    from quantize.check import preflight
    from quantize.run import quantize

    chosen = recipes
    if sizing is not None:
        smaller = Sizing.model_validate(sizing)
        chosen = [smaller.apply(r) for r in chosen]
    resolved, found = preflight(model, chosen, target)
    failures = []
    bar = tqdm(chosen, desc="quantize", unit="recipe")
    for recipe in bar:
        bar.set_postfix_str(recipe.name)
        try:
            manifest, reused = quantize(recipe, model=resolved, run_dir=run_dir, layout=found, target=target,
                                        force=force, sizing=sizing)
        except QuantgateError as err:
            if err.exit_code != 1:
                raise  # input problems (disk, ...) stop the stage; finished recipes stay in place
            failures.append(recipe.name)
            tqdm.write(f"quantgate: {recipe.name}: FAILED: {err}")
            continue
        except Exception as err:  # llmcompressor/torch broke on this recipe: record it, build the others
            failures.append(recipe.name)
            tqdm.write(f"quantgate: {recipe.name}: FAILED in llmcompressor: {type(err).__name__}: {err}")
            continue
        if "fallback" in manifest.device:
            tqdm.write(f"quantgate: {recipe.name}: note: {manifest.device['fallback']}")
        what = "reused (same content key)" if reused else f"{manifest.wall_seconds:.1f}s"
        tqdm.write(
            f"quantgate: {recipe.name}: {what}, {manifest.bytes_on_disk / 2**20:.1f} MiB, "
            f"peak RSS {manifest.peak_memory['rss_bytes'] / 2**30:.2f} GiB -> {run_dir / recipe.name}"
        )
    if failures:
        tqdm.write(f"quantgate: failed recipes: {', '.join(failures)} (the others are complete)")
        return EXIT_PARTIAL
    return EXIT_OK


__all__ = ["Recipe", "run_stage"]
