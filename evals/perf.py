"""Bench settings and the pure arithmetic around them: /metrics parsing, SLO point, capacity, cost.

No I/O here beyond reading a YAML file: the runner (evals/bench_stage.py) drives `vllm bench serve`
and hands its numbers to these functions, which the unit tests check with known values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qgcore.errors import ConfigError, format_validation_error

# On-demand list prices in USD per GPU-hour (typical cloud, late 2026); override in the bench YAML.
DEFAULT_PRICES = {"H100": 2.40, "H200": 3.20, "A100": 1.50, "L40S": 1.00, "L4": 0.70, "B200": 5.00, "cpu": 0.10}


class SLO(BaseModel):
    """Latency a chat product promises (seed-playbook defaults: TTFT p95 <= 3 s, ITL p95 <= 50 ms)."""

    model_config = ConfigDict(extra="forbid")
    ttft_p95_s: float = Field(default=3.0, gt=0)
    itl_p95_ms: float = Field(default=50.0, gt=0)


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concurrency: list[int] = [1, 8, 32]
    input_len: int = Field(default=128, ge=1)
    output_len: int = Field(default=64, ge=1)
    prompts_per_level: int = Field(default=2, ge=1)  # num_prompts = max(min_prompts, this x concurrency)
    min_prompts: int = Field(default=8, ge=1)
    seed: int = 0
    context_len: int = Field(default=2048, ge=1)  # L in "max concurrent sequences at context length L"
    slo: SLO = SLO()
    prices: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    hardware: str | None = None  # price key; default: detected GPU name, or "cpu"
    scrape_interval_s: float = Field(default=0.5, gt=0)

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError("concurrency must be a non-empty list of positive integers")
        return sorted(set(v))

    @field_validator("prices")
    @classmethod
    def _prices(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, p in v.items() if not isinstance(p, (int, float)) or p <= 0]
        if bad:
            raise ValueError(f"prices must be positive USD per hour; bad: {', '.join(bad)}")
        return v

    def num_prompts(self, concurrency: int) -> int:
        return max(self.min_prompts, self.prompts_per_level * concurrency)


def load_bench_config(path: Path | None, concurrency: str | None = None) -> BenchConfig:
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"bench config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: bench config must be a YAML mapping")
    if concurrency:
        try:
            data["concurrency"] = [int(x) for x in concurrency.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--concurrency '{concurrency}': use comma-separated integers like 1,8,32") from None
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(f"bench config {path or '(defaults)'}", err)) from None


# --- /metrics -------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, Any]:
    """The four operator signals from a Prometheus text page (summed over label sets)."""
    out: dict[str, Any] = {"kv_cache_usage_perc": None, "num_requests_waiting": None, "num_requests_running": None,
                           "queue_time_sum": None, "queue_time_count": None, "queue_time_buckets": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:kv_cache_usage_perc":
                out["kv_cache_usage_perc"] = (out["kv_cache_usage_perc"] or 0.0) + s.value
            elif s.name == "vllm:num_requests_waiting":
                out["num_requests_waiting"] = (out["num_requests_waiting"] or 0.0) + s.value
            elif s.name == "vllm:num_requests_running":
                out["num_requests_running"] = (out["num_requests_running"] or 0.0) + s.value
            elif s.name == "vllm:request_queue_time_seconds_sum":
                out["queue_time_sum"] = (out["queue_time_sum"] or 0.0) + s.value
            elif s.name == "vllm:request_queue_time_seconds_count":
                out["queue_time_count"] = (out["queue_time_count"] or 0.0) + s.value
            elif s.name == "vllm:request_queue_time_seconds_bucket":
                le = float(s.labels["le"])
                out["queue_time_buckets"][le] = out["queue_time_buckets"].get(le, 0.0) + s.value
    return out


def histogram_bound(q: float, buckets: dict[float, float]) -> float | None:
    """Upper bound of the bucket holding the q-quantile of cumulative buckets {le: count}: "<= this".

    Not interpolated: with queue times mostly ~0, Prometheus-style linear interpolation would report
    half of the first bucket's width, a number no request had.
    """
    if not buckets:
        return None
    total = buckets[max(buckets)]
    if total <= 0:
        return None
    return min(b for b, c in buckets.items() if c >= q * total)


def summarize_scrapes(first: dict[str, Any], scrapes: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak/mean of the gauges over a level, and the queue-time histogram of just that level's requests."""
    def series(name: str) -> list[float]:
        return [s[name] for s in scrapes if s.get(name) is not None]

    out: dict[str, Any] = {}
    for name in ("kv_cache_usage_perc", "num_requests_waiting", "num_requests_running"):
        vals = series(name)
        out[name] = {"peak": max(vals) if vals else None, "mean": sum(vals) / len(vals) if vals else None,
                     "samples": len(vals)}
    last = scrapes[-1] if scrapes else first
    n = (last.get("queue_time_count") or 0.0) - (first.get("queue_time_count") or 0.0)
    s = (last.get("queue_time_sum") or 0.0) - (first.get("queue_time_sum") or 0.0)
    before = first.get("queue_time_buckets", {})
    delta = {b: c - before.get(b, 0.0) for b, c in last.get("queue_time_buckets", {}).items()}
    out["request_queue_time_seconds"] = {
        "count": n, "mean": s / n if n else None,
        "p50_le": histogram_bound(0.5, delta) if n else None,
        "p95_le": histogram_bound(0.95, delta) if n else None,
        "max_le": histogram_bound(1.0, delta) if n else None,
    }
    return out


# --- SLO point, capacity and cost -----------------------------------------------------------------

def meets_slo(level: dict[str, Any], slo: SLO) -> bool:
    ttft, itl = level.get("p95_ttft_ms"), level.get("p95_itl_ms")
    if ttft is None or itl is None or level.get("failed", 0):
        return False
    return ttft <= slo.ttft_p95_s * 1000 and itl <= slo.itl_p95_ms


def cost_per_million(price_per_hour: float, output_tokens_per_s: float) -> float | None:
    """USD per 1M output tokens = $/h / (tokens/s x 3600) x 1e6."""
    if output_tokens_per_s <= 0:
        return None
    return price_per_hour / (output_tokens_per_s * 3600.0) * 1e6


def slo_point(levels: list[dict[str, Any]], slo: SLO, price_per_hour: float) -> dict[str, Any] | None:
    """Highest concurrency that meets the SLO, with its sustained throughput and cost; None if none does."""
    ok = [lv for lv in levels if meets_slo(lv, slo)]
    if not ok:
        return None
    best = max(ok, key=lambda lv: lv["concurrency"])
    tps = float(best["output_throughput"])
    return {"concurrency": best["concurrency"], "output_tokens_per_s": tps,
            "requests_per_s": float(best["request_throughput"]), "price_per_hour": price_per_hour,
            "usd_per_1m_output_tokens": cost_per_million(price_per_hour, tps)}


def max_sequences(kv_cache_tokens: int | None, context_len: int) -> float | None:
    """How many sequences of `context_len` tokens fit in the KV cache at once."""
    if not kv_cache_tokens or context_len <= 0:
        return None
    return kv_cache_tokens / context_len


def price_for(config: BenchConfig, hardware: dict[str, Any]) -> tuple[str, float]:
    key = config.hardware
    if key is None:
        gpu = str(hardware.get("gpu") or "")
        key = next((k for k in config.prices if k != "cpu" and k.lower() in gpu.lower()), "cpu")
    if key not in config.prices:
        raise ConfigError(f"no price for hardware '{key}': add it under prices: in the bench config")
    return key, config.prices[key]
