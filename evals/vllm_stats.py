"""What vLLM itself says about memory, parsed in one place: its start-up log and its /metrics.

Formats (vLLM 0.32 source; the CPU ones also seen in this machine's server logs):
  GPU: "Model loading took %s GiB memory and %.6f seconds"   (v1/worker/gpu_model_runner.py:5150, local rank
       0 only; v1/worker/gpu/model_runner.py:425 in the V2 runner, every rank, prefixed "(Worker_TP<n> ...)")
  GPU: "Available KV cache memory: %s GiB"                    (v1/worker/gpu_worker.py:760, local rank 0)
  both: "%s KV cache size: %s tokens, Maximum concurrency for %s tokens per request: %.2fx"
                                                              (v1/core/kv_cache_utils.py:2327, the engine: all ranks)
  both: "Filesystem type for checkpoints: %s. Checkpoint size: %.2f GiB. Available RAM: %.2f GiB."
                                                              (model_executor/model_loader/weight_utils.py:1108)
  CPU: "Explicitly set (%s/%s) GiB for KV cache on node %d."  (v1/worker/cpu_worker.py:260, every rank)
  /metrics: vllm:cache_config_info{block_size="16",cache_dtype="fp8",num_gpu_blocks="51934",...} 1.0
            (v1/metrics/loggers.py:1114; every CacheConfig field is a label)
Every number comes back with its source, so an artifact can say where it came from. With tensor
parallel, per-rank numbers are summed over ranks (printed by each rank) or multiplied by the TP size
(printed by rank 0 alone), and the source says which.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

GIB = 1 << 30
_LOADING = re.compile(r"Model loading took ([\d.]+) ?GiB(?: memory)?(?: and ([\d.]+) seconds)?")
_KV_MEM = re.compile(r"Available KV cache memory: ([\d.]+) ?GiB")
_KV_SIZE = re.compile(r"(GPU|CPU|\w+) KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                      r"request: ([\d.]+)x")
_CKPT = re.compile(r"Checkpoint size: ([\d.]+) GiB")
_CPU_KV = re.compile(r"(?:Explicitly|Auto) set \(([\d.]+)/[\d.]+\) GiB for KV cache on node")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _per_rank(values: list[float], tp: int, src: str) -> tuple[float, str]:
    if len(values) >= tp > 1:
        return sum(values[:tp]), f"{src}, summed over {tp} ranks"
    if tp > 1:
        return values[0] * tp, f"{src}, printed by rank 0 only: x {tp} ranks (equal shards)"
    return values[0], src


def parse_startup(text: str, *, cpu_kv_cache_gib: float | None = None, tensor_parallel: int = 1) -> dict[str, Any]:
    """Numbers from a vLLM server log: {"weights_bytes", "kv_cache_bytes", "kv_cache_tokens", ...,
    "sources": {name: where it came from}}; absent numbers are left out."""
    out: dict[str, Any] = {}
    src: dict[str, str] = {}
    tp = max(tensor_parallel, 1)
    loads = _LOADING.findall(text)
    if loads:
        total, how = _per_rank([float(g) for g, _ in loads], tp,
                               "vLLM start-up log: 'Model loading took … GiB memory' (device memory of the weights)")
        out["weights_bytes"], src["weights_bytes"] = int(total * GIB), how
        if loads[0][1]:
            out["weights_load_seconds"] = float(loads[0][1])
            src["weights_load_seconds"] = "vLLM start-up log: 'Model loading took … seconds'"
    if m := _CKPT.search(text):
        out["checkpoint_bytes"] = int(float(m.group(1)) * GIB)
        src["checkpoint_bytes"] = "vLLM start-up log: 'Checkpoint size: … GiB'"
    kv = _KV_MEM.findall(text)
    cpu_kv = _CPU_KV.findall(text)
    if kv:
        total, how = _per_rank([float(x) for x in kv], tp,
                               "vLLM start-up log: 'Available KV cache memory: … GiB'")
        out["kv_cache_bytes"], src["kv_cache_bytes"] = int(total * GIB), how
    elif cpu_kv:
        total, how = _per_rank([float(x) for x in cpu_kv], tp,
                               "vLLM start-up log: 'Explicitly set (…) GiB for KV cache' (CPU)")
        out["kv_cache_bytes"], src["kv_cache_bytes"] = int(total * GIB), how
    elif cpu_kv_cache_gib is not None and "CPU KV cache size" in text:
        out["kv_cache_bytes"] = int(cpu_kv_cache_gib * GIB * tp)
        src["kv_cache_bytes"] = "VLLM_CPU_KVCACHE_SPACE (the CPU build's fixed KV-cache reservation per rank)"
    if m := _KV_SIZE.search(text):
        out["kv_cache_device"] = m.group(1)
        out["kv_cache_tokens"] = _int(m.group(2))
        out["max_concurrency_context_len"] = _int(m.group(3))
        out["max_concurrency"] = float(m.group(4))
        src["kv_cache_tokens"] = f"vLLM start-up log: '{m.group(1)} KV cache size: … tokens'"
        src["max_concurrency"] = "vLLM start-up log: 'Maximum concurrency for … tokens per request'"
    out["sources"] = src
    return out


def parse_cache_config_info(metrics_text: str) -> dict[str, Any]:
    """vllm:cache_config_info labels from a /metrics scrape (prometheus_client's parser), with KV tokens =
    kv_cache_size_tokens, else num_gpu_blocks × block_size."""
    labels: dict[str, str] | None = None
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name == "vllm:cache_config_info":
            labels = dict(fam.samples[0].labels) if fam.samples else None
            break
    if labels is None:
        return {}
    out: dict[str, Any] = {"cache_dtype": labels.get("cache_dtype")}
    src: dict[str, str] = {}
    if (v := labels.get("kv_cache_memory_bytes", "None")).isdigit():
        out["kv_cache_bytes"] = int(v)
        src["kv_cache_bytes"] = "/metrics vllm:cache_config_info kv_cache_memory_bytes"
    if (v := labels.get("kv_cache_size_tokens", "None")).isdigit():
        out["kv_cache_tokens"] = int(v)
        src["kv_cache_tokens"] = "/metrics vllm:cache_config_info kv_cache_size_tokens"
    elif labels.get("num_gpu_blocks", "None").isdigit() and labels.get("block_size", "None").isdigit():
        out["kv_cache_tokens"] = int(labels["num_gpu_blocks"]) * int(labels["block_size"])
        src["kv_cache_tokens"] = "/metrics vllm:cache_config_info num_gpu_blocks × block_size"
    out["sources"] = src
    return out
