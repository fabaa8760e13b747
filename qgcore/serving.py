"""How a variant is served: the flags that change what is served, and the `vllm serve` line to deploy it.

Pure data, no process handling (that is evals.serve): the eval and bench stages start servers with
it, and the verdict prints the same deploy line from a manifest's serving spec. One home for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ServeConfig:
    """Flags that change what is served; all of them go into eval/bench provenance and cache keys."""

    kv_cache_dtype: str = "auto"
    max_model_len: int = 2048
    seed: int = 0
    enable_prefix_caching: bool = True  # production default in the seed playbook
    extra_args: list[str] = field(default_factory=list)
    cpu_kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    # vLLM-CPU keeps one core per worker for its scheduler: on 2 cores the model then computes on one. For
    # scoring (prefill only) 0 lets it use both: lm-eval through the server 1.64x faster on this 2-core machine,
    # identical scores. Decoding suffers (bf16 ITL p50 48 ms vs 20 ms: the threads fight the scheduler), so
    # the bench keeps vLLM's own default (None: not set), as production serves.
    cpu_reserved_cores: int | None = None
    gpu_memory_utilization: float = 0.85
    # Set where cells share one CPU machine (the Ray executor, QUANTGATE_CPU_THREADS): this many unpinned
    # compute threads, so two servers never pin themselves onto the same cores.
    cpu_threads: int | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, scoring: bool = False) -> ServeConfig:
        """From a manifest's `serve` section (the recipe's ServeSpec as JSON). `scoring`: a server that only
        scores prompts (the eval stage) computes on every CPU core; a bench server runs as vLLM defaults."""
        threads = os.environ.get("QUANTGATE_CPU_THREADS")
        return cls(kv_cache_dtype=spec.get("kv_cache_dtype", "auto"), extra_args=list(spec.get("extra_args", [])),
                   cpu_reserved_cores=0 if scoring else None, cpu_threads=int(threads) if threads else None)

    def env(self, cuda: bool) -> dict[str, str]:
        """Environment settings that change how the server runs (and so every number it produces)."""
        if cuda:
            return {}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib)}
        if self.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.cpu_reserved_cores)
        if self.cpu_threads is not None:
            env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(self.cpu_threads)}
        return env

    def args(self, cuda: bool) -> list[str]:
        out = ["--seed", str(self.seed), "--max-model-len", str(self.max_model_len),
               "--kv-cache-dtype", self.kv_cache_dtype]
        out.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if cuda:
            out += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        else:
            out.append("--enforce-eager")  # torch.compile warm-up costs ~90 s on CPU and buys little here
        return out + list(self.extra_args)


def deploy_command(checkpoint: Path, name: str, config: ServeConfig) -> str:
    """The equivalent `vllm serve` line for a GPU deployment (what the verdict recommends)."""
    return " ".join(["vllm", "serve", str(checkpoint), "--served-model-name", name, *config.args(cuda=True)])
