"""What vLLM itself says about memory, parsed in one place: its start-up log and its /metrics.

Formats (vLLM 0.32 source; the CPU ones also seen in this machine's server logs):
  GPU: "Model loading took 15.06 GiB memory and 4.512345 seconds"      (gpu_model_runner.py)
  GPU: "Available KV cache memory: 101.44 GiB"                          (gpu_worker.py)
  both: "GPU|CPU KV cache size: 830,944 tokens, Maximum concurrency for 2,048 tokens per request: 405.73x"
  CPU: "Filesystem type for checkpoints: EXT4. Checkpoint size: 0.25 GiB. Available RAM: 21.49 GiB."
  /metrics: vllm:cache_config_info{block_size="16",cache_dtype="fp8",num_gpu_blocks="51934",...} 1.0
Every number comes back with its source, so an artifact can say where it came from.
"""

from __future__ import annotations

import re
from typing import Any

GIB = 1 << 30
_LOADING = re.compile(r"Model loading took ([\d.]+) ?GiB(?: memory)?(?: and ([\d.]+) seconds)?")
_KV_MEM = re.compile(r"Available KV cache memory: ([\d.]+) ?GiB")
_KV_SIZE = re.compile(r"(GPU|CPU|\w+) KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                      r"request: ([\d.]+)x")
_CKPT = re.compile(r"Checkpoint size: ([\d.]+) GiB")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def parse_startup(text: str, *, cpu_kv_cache_gib: float | None = None) -> dict[str, Any]:
    """Numbers from a vLLM server log: {"weights_bytes", "kv_cache_bytes", "kv_cache_tokens", ...,
    "sources": {name: where it came from}}; absent numbers are left out."""
    out: dict[str, Any] = {}
    src: dict[str, str] = {}
    if m := _LOADING.search(text):
        out["weights_bytes"] = int(float(m.group(1)) * GIB)
        src["weights_bytes"] = "vLLM start-up log: 'Model loading took … GiB memory' (device memory of the weights)"
        if m.group(2):
            out["weights_load_seconds"] = float(m.group(2))
            src["weights_load_seconds"] = "vLLM start-up log: 'Model loading took … seconds'"
    if m := _CKPT.search(text):
        out["checkpoint_bytes"] = int(float(m.group(1)) * GIB)
        src["checkpoint_bytes"] = "vLLM start-up log: 'Checkpoint size: … GiB' (CPU builds)"
    if m := _KV_MEM.search(text):
        out["kv_cache_bytes"] = int(float(m.group(1)) * GIB)
        src["kv_cache_bytes"] = "vLLM start-up log: 'Available KV cache memory: … GiB'"
    elif cpu_kv_cache_gib is not None and "CPU KV cache size" in text:
        out["kv_cache_bytes"] = int(cpu_kv_cache_gib * GIB)
        src["kv_cache_bytes"] = "VLLM_CPU_KVCACHE_SPACE (the CPU build's fixed KV-cache reservation)"
    if m := _KV_SIZE.search(text):
        out["kv_cache_device"] = m.group(1)
        out["kv_cache_tokens"] = _int(m.group(2))
        out["max_concurrency_context_len"] = _int(m.group(3))
        out["max_concurrency"] = float(m.group(4))
        src["kv_cache_tokens"] = f"vLLM start-up log: '{m.group(1)} KV cache size: … tokens'"
        src["max_concurrency"] = "vLLM start-up log: 'Maximum concurrency for … tokens per request'"
    out["sources"] = src
    return out


_INFO = re.compile(r'^vllm:cache_config_info\{(.*?)\}\s+\S+', re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_cache_config_info(metrics_text: str) -> dict[str, Any]:
    """vllm:cache_config_info labels from a /metrics scrape, with KV tokens = num_gpu_blocks × block_size."""
    m = _INFO.search(metrics_text)
    if not m:
        return {}
    labels = dict(_LABEL.findall(m.group(1)))
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
