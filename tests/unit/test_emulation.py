"""The CPU FP4 rounding registered for emulated scoring equals compressed-tensors' own fallback bit for bit,
and compressed-tensors' dispatcher really routes CPU tensors to it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4  # noqa: E402
from compressed_tensors.utils.impl_backend import ImplBackend  # noqa: E402

from evals import emulation  # noqa: E402


def _library(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' eager fallback (the entry point's own body), on a copy."""
    return ImplBackend.call("cast_to_fp4", x.clone())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))  # -0.0 vs 0.0 counts as a difference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_value_rounds_as_the_library_does(dtype: torch.dtype) -> None:
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert _same_bits(emulation.round_to_fp4(x), _library(x))


def test_fp32_midpoints_neighbours_and_specials() -> None:
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 2.0, 4.0])
    up = torch.nextafter(mids, torch.full_like(mids, 10.0))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3e38, 7.0, 6.5])
    base = torch.cat([mids, up, down, special])
    x = torch.cat([base, -base, torch.randn(200_000) * 4])
    got, want = emulation.round_to_fp4(x), _library(x)
    assert _same_bits(got, want)
    # and the grid really is E2M1's: midpoints go to the even mantissa
    assert emulation.round_to_fp4(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 9.0])).tolist() == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_install_routes_cpu_tensors_through_compressed_tensors_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert emulation.install() and emulation.install()  # idempotent
    calls = []
    real = emulation.round_to_fp4

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(emulation, "round_to_fp4", spy)
    x = torch.randn(64, 16) * 3
    assert _same_bits(cast_to_fp4(x), _library(x))
    assert calls == [x.shape]
    assert ImplBackend.call("quantgate_cast_to_fp4_cpu", x).shape == x.shape


def test_nvfp4_widening_is_scoped_to_one_load() -> None:
    """An emulated fp32 load must not leak into the next bf16 load in the same process (a test after the
    e2e suite loaded NVFP4 weights widened to fp32 into a bf16 model): the dtype is restored, even on error."""
    def failing_load() -> None:
        with emulation.loading("float32"):
            assert emulation._dtype == "float32"
            raise OSError("a load that fails")

    assert emulation._dtype == "bfloat16"
    with pytest.raises(OSError, match="a load that fails"):
        failing_load()
    assert emulation._dtype == "bfloat16"
