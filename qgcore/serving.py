"""How a variant is served: its flags, its environment, its context and tensor-parallel size, and the
`vllm serve` line that deploys it. Pure data, no process handling (that is evals.serve).

One home: the eval and bench stages start servers from `ServeConfig`, the verdict and the deploy kit
print the same flags, and `server_environment` builds the server's environment *and* what cache keys
and provenance record from one dict, so a caller's OMP_* / VLLM_* setting is never silently different
from what was recorded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qgcore.device import Platform

Purpose = Literal["score", "bench"]
GPU_MEMORY_UTILIZATION = 0.85  # of each GPU for vLLM (weights + KV cache); the rest for CUDA graphs, NCCL
HEADROOM = 1.3  # weights x this must fit what vLLM may use: activations, KV cache for useful batches
# Environment variables that can move a number a server produces (threads, kernels, attention backends):
# their effective values are recorded; the ones below only change logging, caching or telemetry.
_NUMBER_PREFIXES = ("VLLM_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "TORCH_", "CUDA_LAUNCH_BLOCKING")
_HARMLESS = frozenset({"VLLM_CACHE_ROOT", "VLLM_NO_USAGE_STATS", "VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING",
                       "VLLM_RPC_TIMEOUT", "VLLM_ENGINE_READY_TIMEOUT_S", "TORCH_HOME", "VLLM_DO_NOT_TRACK"})


@dataclass(frozen=True)
class ServeConfig:
    """Flags and environment that change what is served; all of them go into provenance and cache keys."""

    platform: Literal["cpu", "cuda"] = "cpu"
    kv_cache_dtype: str = "auto"
    max_model_len: int = 2048
    tensor_parallel: int = 1
    seed: int = 0
    enable_prefix_caching: bool = True  # production default in the seed playbook
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    max_num_seqs: int | None = None  # vLLM's default (256) unless the measured capacity says otherwise
    extra_args: tuple[str, ...] = ()
    cpu_kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE on CPU builds (per rank)
    # vLLM-CPU reserves one core per rank for its scheduler: on 2 cores the model then computes on one. A
    # scoring server (prefill only) uses every core (lm-eval through the server 1.64x faster here, identical
    # scores); a bench server keeps vLLM's default (None), as production serves (decode suffers otherwise).
    cpu_reserved_cores: int | None = None
    # Ray cells sharing one CPU machine: this many unpinned compute threads each (the cell's CPU request)
    cpu_threads: int | None = None
    cpu_cores: tuple[int, ...] = ()  # the cores a CPU server may use (tensor-parallel ranks split them)
    dtype: str = "auto"  # the checkpoint's (bf16); float32 on CPUs without bf16 arithmetic (compute_dtype)

    def args(self) -> list[str]:
        out = ["--seed", str(self.seed), "--max-model-len", str(self.max_model_len),
               "--kv-cache-dtype", self.kv_cache_dtype]
        out.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.dtype != "auto":
            out += ["--dtype", self.dtype]
        if self.tensor_parallel > 1:
            # mp, never the ambient Ray: inside a Ray task the GPUs are already this cell's
            out += ["--tensor-parallel-size", str(self.tensor_parallel), "--distributed-executor-backend", "mp"]
        if self.max_num_seqs is not None:
            out += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.platform == "cuda":
            out += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        else:
            out.append("--enforce-eager")  # torch.compile warm-up costs ~90 s on CPU and buys little here
        return out + list(self.extra_args)

    def env(self) -> dict[str, str]:
        """The settings this config asks of the server's environment (CPU builds only)."""
        if self.platform == "cuda":
            return {}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib)}
        if self.tensor_parallel > 1:
            # vLLM-CPU's default `auto` binding needs one NUMA node per rank (vllm/utils/ompmultiprocessing.py:
            # 216); an explicit `a,b|c,d` list gives each rank its own cores (ompmultiprocessing.py:152)
            cores = self.cpu_cores or tuple(sorted(os.sched_getaffinity(0)))
            per = max(len(cores) // self.tensor_parallel, 1)
            lists = [cores[i * per:(i + 1) * per] or cores[-1:] for i in range(self.tensor_parallel)]
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, c)) for c in lists)
        elif self.cpu_threads is not None:
            env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(self.cpu_threads)}
        elif self.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.cpu_reserved_cores)
        return env

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ServerEnv:
    env: dict[str, str]  # what the process gets
    recorded: dict[str, str]  # the number-moving part of it, as it really is: provenance and cache keys


def moves_numbers(key: str) -> bool:
    return key.startswith(_NUMBER_PREFIXES) and key not in _HARMLESS


def pinned_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The user's number-moving settings, captured once when the run context is resolved: a library that sets
    one later in the process (or another node's environment) never changes what a server gets or a key says."""
    return {k: v for k, v in sorted(environ.items()) if moves_numbers(k)}


def server_environment(config: ServeConfig, base: Mapping[str, str], *, cache_root: Path,
                       pinned: Mapping[str, str] | None = None) -> ServerEnv:
    """The one place a server's environment is built: `base` (this process's) without its number-moving
    variables, plus the run's `pinned` ones (the caller's explicit settings, captured at start), plus the
    config's settings where the caller set none. `recorded` is the number-moving part as it really is, so a
    cache key never claims what was not served."""
    env = {k: v for k, v in base.items() if not moves_numbers(k)}
    env |= dict(pinned if pinned is not None else pinned_environment(base))
    for key, value in config.env().items():
        env.setdefault(key, value)  # an explicit setting in the caller's environment wins, and is recorded
    env.setdefault("VLLM_CACHE_ROOT", str(cache_root / "vllm"))
    env.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local; never reach for the hub mid-serve
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["PYTHONUNBUFFERED"] = "1"
    recorded = {k: v for k, v in sorted(env.items()) if moves_numbers(k)}
    return ServerEnv(env, recorded)


def flags_of(config: ServeConfig, recorded: Mapping[str, str]) -> list[str]:
    """What a cache key and provenance say was served: the flags plus the effective environment."""
    return config.args() + [f"{k}={v}" for k, v in recorded.items()]


# ---- sizing: context and tensor parallel ----------------------------------------------------------------

def gpus_for(weight_bytes: float, gpu_memory_bytes: float, *, max_gpus: int | None = None) -> int:
    """Tensor-parallel size: the weights (x HEADROOM) over what vLLM may use of one GPU, rounded up to a
    power of two. The one function the executor, the eval/bench stages and `quantgate plan` use."""
    need = weight_bytes * HEADROOM / (gpu_memory_bytes * GPU_MEMORY_UTILIZATION)
    tp = 1 if need <= 1 else 2 ** math.ceil(math.log2(need))
    return min(tp, max_gpus) if max_gpus else tp


def kv_bytes_per_token(model: Mapping[str, Any], kv_cache_dtype: str) -> int | None:
    """K and V for every layer: 2 x layers x KV heads x head dim x bytes per element."""
    try:
        layers, kv_heads, head_dim = (int(model[k]) for k in ("num_hidden_layers", "num_key_value_heads", "head_dim"))
    except (KeyError, TypeError, ValueError):
        return None
    return 2 * layers * kv_heads * head_dim * (1 if kv_cache_dtype.startswith("fp8") else 2)


@dataclass(frozen=True)
class VariantServing:
    """What the run decided for one variant's servers, with where each number came from."""

    tensor_parallel: int
    gpus: int
    max_model_len: int
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_serving(*, weight_bytes: int, model: Mapping[str, Any], on: Platform, tp_override: int | None = None,
                 max_model_len_cap: int | None = None) -> VariantServing:
    """Serve at the model's own context (max_position_embeddings) unless capped; TP from the weights over one
    GPU's memory unless overridden (CPU: 1 unless overridden)."""
    native = model.get("max_position_embeddings")
    if max_model_len_cap is not None:
        ctx = min(max_model_len_cap, int(native)) if native else max_model_len_cap
        ctx_src = f"--max-model-len {max_model_len_cap}" + (f" (the model's own: {native})" if native else "")
    elif native:
        ctx, ctx_src = int(native), "the model's max_position_embeddings"
    else:
        ctx, ctx_src = 2048, "vLLM's fallback (the config names no context length)"
    if tp_override is not None:
        tp, tp_src = tp_override, "--tensor-parallel"
    elif on.kind == "cuda" and on.gpu_memory_bytes:
        # vLLM refuses to start when the KV cache cannot hold one sequence of max_model_len tokens
        # (vllm/v1/core/kv_cache_utils.py, check_enough_kv_cache_memory): weights x HEADROOM plus that sequence
        kv = (kv_bytes_per_token(model, "auto") or 0) * ctx
        tp = gpus_for(weight_bytes + kv / HEADROOM, on.gpu_memory_bytes, max_gpus=None)
        heads = int(model.get("num_attention_heads") or 0)
        fits = [t for t in (tp * 2**i for i in range(4)) if heads and t <= heads and heads % t == 0]
        tp = fits[0] if fits else tp  # vllm/config/model.py:1546: heads % TP == 0 (else the preflight says so)
        tp_src = (f"weights {weight_bytes / 2**30:.1f} GiB x {HEADROOM} + one {ctx}-token sequence's KV "
                  f"{kv / 2**30:.1f} GiB over {GPU_MEMORY_UTILIZATION} of {on.gpu_memory_bytes / 2**30:.0f} GiB "
                  f"({on.label})" + (f", divisible into {heads} heads" if heads else ""))
    else:
        tp, tp_src = 1, "one rank" + (" (CPU)" if on.kind == "cpu" else " (GPU memory unknown)")
    sources = {"max_model_len": ctx_src, "tensor_parallel": tp_src}
    return VariantServing(tp, tp if on.kind == "cuda" else 0, ctx, sources)


def compute_dtype(on: Platform) -> str:
    """The activation dtype a platform scores in: the checkpoint's bf16, except on an x86 CPU without AVX-512,
    where vllm-cpu loads its _C_AVX2 build (vllm/platforms/cpu.py:657) and bf16 arithmetic is emulated:
    SmolLM2-135M there scored 57 prompt tok/s in bf16 and 380 in float32 (vllm-cpu 0.32, 2 cores), and
    transformers 58 vs 448. bf16 weights widen to float32 exactly; both sides of every comparison use the
    same dtype, and it is in every cache key and in eval.json's server command."""
    return "float32" if on.kind == "cpu" and on.cpu_isa == "avx2" else "bfloat16"


def config_for(serve_spec: Mapping[str, Any], serving: VariantServing, on: Platform, *, purpose: Purpose,
               cpu_threads: int | None = None, max_num_seqs: int | None = None) -> ServeConfig:
    """The server config for one variant from its manifest's `serve` spec and the run's serving plan."""
    return ServeConfig(platform=on.kind, kv_cache_dtype=serve_spec.get("kv_cache_dtype", "auto"),
                       max_model_len=serving.max_model_len, tensor_parallel=serving.tensor_parallel,
                       extra_args=tuple(serve_spec.get("extra_args", ())),
                       cpu_reserved_cores=0 if purpose == "score" else None, cpu_threads=cpu_threads,
                       max_num_seqs=max_num_seqs, dtype="float32" if compute_dtype(on) == "float32" else "auto")


def deploy_command(checkpoint: Path | str, name: str, config: ServeConfig) -> str:
    """The equivalent `vllm serve` line for a GPU deployment (what the verdict recommends)."""
    gpu = replace(config, platform="cuda", cpu_reserved_cores=None, cpu_threads=None, dtype="auto")
    return " ".join(["vllm", "serve", str(checkpoint), "--served-model-name", name, *gpu.args()])
