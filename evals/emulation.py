"""Emulated scoring (transformers + compressed-tensors) at a usable speed on CPU.

compressed-tensors fake-quantizes NVFP4 activations on every forward. On CUDA it rounds to the FP4 (E2M1)
grid with a Triton kernel; on CPU its eager fallback makes eight masked passes over the tensor: an emulated
NVFP4 forward took 3.4x a bf16 one here (4 x 1,024 tokens, SmolLM2-135M, 2 cores), the slowest eval of the
demo. `install()` registers a rounding in a few elementwise passes (round to the grid's local spacing, ties
to even) through compressed-tensors' own backend registry (`ImplBackend.register`), for CPU tensors only:
the same forward drops from 7.2-7.9 s to 5.0-5.3 s (bf16: 2.1-2.6 s; the rest is the library's scale
arithmetic). Its output equals the library's fallback bit for bit on every bf16 and fp16 value and on fp32
edges (tests/unit/test_emulation.py), and the model's logits are identical, so scores do not move; the
emulated engine's flags still name it, so cached emulated scores are keyed by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FP4_ROUNDING = "fp4-round:spacing-v1"  # part of the emulated engine's flags (cache keys, provenance)

_installed = False


def round_to_fp4(x: Any) -> Any:
    """Nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6; sign kept) in x's dtype; NaN stays NaN, +-inf -> +-6.

    The grid's spacing is 0.5 below 2, 1 below 4 and 2 above, so rounding to it is rounding to the spacing, and
    torch.round's ties-to-even lands a midpoint on the even mantissa, as compressed-tensors' fallback does
    (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4). Scaling by a power of two is exact.
    """
    import torch

    mag = torch.abs(x)
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(x.dtype)
    return torch.clamp(torch.round(mag / step) * step, max=6.0) * torch.sign(x)


_dtype = "bfloat16"
_widened = False


def _widen_nvfp4() -> None:
    global _widened
    if _widened:
        return
    try:
        from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    except ImportError:
        return
    import torch

    original = NVFP4PackedCompressor.decompress.__func__  # type: ignore[attr-defined]

    def decompress(cls: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(cls, *args, **kwargs)
        want = getattr(torch, _dtype)
        for key in ("weight", "weight_scale"):
            t = out.get(key) if isinstance(out, dict) else None
            if t is not None and t.is_floating_point() and t.dtype != want and want == torch.float32:
                out[key] = torch.nn.Parameter(t.to(want), requires_grad=False) if isinstance(
                    t, torch.nn.Parameter) else t.to(want)
        return out

    NVFP4PackedCompressor.decompress = classmethod(decompress)  # type: ignore[method-assign]
    _widened = True


@contextmanager
def loading(dtype: str) -> Iterator[None]:
    """NVFP4 checkpoints loaded and run inside this block decompress into `dtype` (compressed-tensors unpacks
    into bf16 whatever the model's dtype, which fails a float32 forward; bf16 values widen exactly; it may
    decompress at the first forward, so the block spans the model's use). Scoped, not process-wide: a bf16 load
    after it (another engine, another test in the same process) gets bf16 again."""
    global _dtype
    install()
    before, _dtype = _dtype, dtype
    try:
        yield
    finally:
        _dtype = before


def install() -> bool:
    """Register `round_to_fp4` as compressed-tensors' `cast_to_fp4` backend for CPU tensors (idempotent; the
    same values as the library's fallback, faster) and the NVFP4 widening hook `loading` sets. Returns False
    where compressed-tensors has no such registry (then its own fallback runs, only slower)."""
    global _installed
    _widen_nvfp4()
    if _installed:
        return True
    try:
        from compressed_tensors.quantization.utils import fp4_utils  # noqa: F401  (registers the entry point)
        from compressed_tensors.utils.impl_backend import ImplBackend
    except ImportError:
        return False

    def _cpu(x: Any) -> bool:  # called with cast_to_fp4's own argument, a tensor
        return x.device.type == "cpu" and x.is_floating_point()

    @ImplBackend.register("cast_to_fp4", _cpu, 1)  # after the Triton kernel (priority 0, CUDA/XPU only)
    def quantgate_cast_to_fp4_cpu(x: Any) -> Any:
        return round_to_fp4(x)

    _installed = True
    return True
