"""quantize(recipe, *, model, run_dir) -> CheckpointManifest: the only caller of llmcompressor's oneshot.

Atomic and resumable: each recipe is built in `.<name>.tmp-<pid>/` beside its final folder and renamed
into place only once the checkpoint is verified and the manifest written. A rerun whose content key
(model revision, recipe hash, calibration, library versions) matches the existing manifest is skipped.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from qgcore import provenance
from qgcore.artifacts import CheckpointManifest, ModelRef, model_config_summary, quantization_summary
from qgcore.device import Platform
from qgcore.errors import GroupSizeError, NoSpaceError, QuantgateError
from qgcore.hashing import MODEL_FILE_SUFFIXES
from qgcore.hashing import content_key as _key
from qgcore.integrity import record_files
from qgcore.memory import PeakRSS
from quantize.calibration import fingerprint
from quantize.hardware import check_target
from quantize.model import Layout, ResolvedModel
from quantize.model import layout as model_layout
from quantize.recipe import Recipe
from quantize.schemes import SCHEMES, check_quantization_config

log = logging.getLogger("quantgate.quantize")
_QUANT_VERSIONS = ("torch", "transformers", "llmcompressor", "compressed-tensors")


def content_key(model: ResolvedModel, recipe: Recipe) -> str:
    return _key({"model": model.revision, "recipe": recipe.content_hash(),
                 "calibration_data": fingerprint(recipe.calibration),
                 "versions": provenance.versions(_QUANT_VERSIONS)})


def check_group_size(recipe: Recipe, widths: dict[str, int]) -> None:
    """Fail before calibration if the group size does not divide a targeted layer's input width."""
    group = recipe.effective_group_size
    if not group:
        return
    ignored = set(recipe.quant.ignore)
    targeted = {n: w for n, w in widths.items() if n.split(".")[-1] not in ignored and n not in ignored}
    bad = {n: w for n, w in targeted.items() if w % group}
    if not bad:
        return
    name, width = next(iter(bad.items()))
    common = math.gcd(*targeted.values())
    fits = [g for g in (16, 32, 64, 128, 256) if common % g == 0]
    hint = f"group sizes that fit every layer: {', '.join(map(str, fits))}" if fits else "no power-of-two group fits"
    raise GroupSizeError(
        f"recipe '{recipe.name}': group_size {group} does not divide layer '{name}' input width {width} "
        f"({len(bad)} layers affected); {hint}"
    )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_disk(run_dir: Path, model_path: Path) -> None:
    need = int(_dir_bytes(model_path) * 1.2) + (64 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise NoSpaceError(
            f"out of disk: {free / 2**30:.1f} GiB free under {run_dir}, a checkpoint needs ~{need / 2**30:.1f} GiB; "
            "free space or set RUNS=/bigger/disk"
        )


def _guard_pin_memory() -> None:
    """llmcompressor's AWQ pins cached activations for faster H2D copies; on CPU-only torch pinning raises
    "Cannot access accelerator device when none is available". Skip pinning only when there is no
    accelerator: there is nothing to copy to, so this changes no result."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available() and not getattr(IntermediatesCache, "_quantgate_guard", False):
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        IntermediatesCache._quantgate_guard = True


def _copy_reference(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES:
            shutil.copy2(f, dst / f.name)


def _oneshot(recipe: Recipe, model: ResolvedModel, out: Path) -> str | None:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize.calibration import build_dataset

    _guard_pin_memory()
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    net = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.bfloat16)
    modifiers = SCHEMES[recipe.quant.scheme].build(recipe)
    kwargs: dict = {}
    provenance_id = None
    if recipe.calibration is not None:
        ds, provenance_id = build_dataset(recipe.calibration, tokenizer)
        kwargs = {
            "dataset": ds,
            "num_calibration_samples": recipe.calibration.num_samples,
            "max_seq_length": recipe.calibration.seq_len,
            "shuffle_calibration_samples": False,  # the seed already chose the samples
        }
    torch.manual_seed(recipe.calibration.seed if recipe.calibration else 0)
    oneshot(model=net, tokenizer=tokenizer, recipe=modifiers, output_dir=str(out), **kwargs)
    return provenance_id


def quantize(
    recipe: Recipe,
    *,
    model: ResolvedModel,
    run_dir: Path,
    layout: Layout | None = None,
    target: Platform | None = None,
    force: bool = False,
    sizing: dict[str, Any] | None = None,
) -> tuple[CheckpointManifest, bool]:
    """Build one variant; returns (manifest, reused). Raises QuantgateError subclasses on bad input.

    Args:
        recipe: the validated recipe (a demo Sizing already applied).
        model: resolved base model (local folder + revision).
        run_dir: `runs/<model-slug>/`; the variant goes to `run_dir/<recipe.name>/`.
        layout: the model's Linear layers and config (read here when not given).
        target: the GPU the checkpoint is for (TARGET_GPU), or None for no check.
        force: rebuild even when the manifest's content key matches.
        sizing: the Sizing applied to the recipe, recorded in the manifest.
    """
    layout = layout or model_layout(model.path)
    fallback_note = check_target(recipe, layout.shapes, layout.config, target)
    check_group_size(recipe, layout.widths)
    key = content_key(model, recipe)
    _clean_stale(run_dir, recipe.name)
    final = run_dir / recipe.name
    manifest_path = final / "manifest.json"
    if not force and manifest_path.is_file():
        try:
            old = CheckpointManifest.read(manifest_path)
        except QuantgateError:
            old = None
        if old and old.content_key == key and (final / old.checkpoint_dir / "config.json").is_file():
            return old, True
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_disk(run_dir, Path(model.path))
    tmp = run_dir / f".{recipe.name}.tmp-{os.getpid()}"
    ckpt = tmp / "checkpoint"
    started = time.perf_counter()
    try:
        with PeakRSS(os.getpid()) as mem:
            cuda_peak = _reset_cuda_peak()
            if recipe.quant.scheme == "none":
                _copy_reference(Path(model.path), ckpt)
                calib_id = None
            else:
                calib_id = _oneshot(recipe, model, ckpt)
            cuda_peak = _read_cuda_peak(cuda_peak)
        wall = time.perf_counter() - started
        config = json.loads((ckpt / "config.json").read_text())
        problems = check_quantization_config(recipe, config)
        if problems:
            raise QuantgateError(f"recipe '{recipe.name}' did not produce what it promised: {problems[0]}")
        peak = {"rss_bytes": mem.peak_bytes, "kind": "host RSS of the quantize process"}
        if cuda_peak is not None:
            peak["cuda_max_allocated_bytes"] = cuda_peak
        manifest = CheckpointManifest(
            content_key=key,
            model=ModelRef(**model.to_dict()),
            recipe=recipe.name,
            family=recipe.family,
            recipe_hash=recipe.content_hash(),
            recipe_spec=recipe.model_dump(mode="json"),
            calibration=recipe.calibration.model_dump(mode="json") if recipe.calibration else None,
            calibration_data=calib_id,
            sizing=sizing if recipe.calibration is not None else None,
            versions=provenance.versions(_QUANT_VERSIONS),
            device={**provenance.hardware(), **({"fallback": fallback_note} if fallback_note else {})},
            wall_seconds=round(wall, 2),
            peak_memory=peak,
            bytes_on_disk=_dir_bytes(ckpt),
            checkpoint_dir="checkpoint",
            files=record_files(ckpt),
            quantization=quantization_summary(config),
            linear_shapes=layout.shapes,
            architecture=model_config_summary(config),
            serve=recipe.serve.model_dump(mode="json"),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        manifest.write(tmp / "manifest.json")  # written last inside tmp: a complete tmp has a manifest
        _swap_into_place(tmp, final)
        return manifest, False
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise NoSpaceError(f"out of disk while writing '{recipe.name}': free space under {run_dir}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_stale(run_dir: Path, name: str) -> None:
    """Remove build folders left by killed runs (their pid is gone); never one a live process is writing."""
    import psutil

    for stale in run_dir.glob(f".{name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not psutil.pid_exists(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp -> final; an older variant folder is moved aside first and deleted after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _reset_cuda_peak() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return 0


def _read_cuda_peak(marker: int | None) -> int | None:
    if marker is None:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())
