"""Bench settings and the pure arithmetic around them: the capacity sweep, /metrics parsing, capacity with
its interval, the interleaved throughput ratio, cost and the self-host break-even.

No I/O here beyond reading a YAML file: the runner (evals/bench_stage.py) drives `vllm bench serve` and
hands its numbers to these functions, which the unit tests check with known values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qgcore.device import CPU_USD_PER_HOUR, GPUS
from qgcore.errors import ConfigError, format_validation_error
from qgcore.sequential import Spending, t_sequential

DEFAULT_PRICES = {name: g.usd_per_hour for name, g in GPUS.items() if g.usd_per_hour} | {"cpu": CPU_USD_PER_HOUR}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SLO(_Strict):
    """Latency a chat product promises (the playbook's paging thresholds: TTFT p95 <= 3 s, ITL p95 <= 50 ms)."""

    ttft_p95_s: float = Field(default=3.0, gt=0)
    itl_p95_ms: float = Field(default=50.0, gt=0)


class Workload(_Strict):
    """What the load generator sends: `random` prompts, or `prefix` (a shared system prompt / multi-turn
    shape: `vllm bench serve`'s prefix_repetition dataset), where prefix caching and FP8-KV pay off."""

    name: str
    kind: Literal["random", "prefix"] = "random"
    input_len: int = Field(default=128, ge=1)  # random: prompt tokens; prefix: the suffix after the shared prefix
    output_len: int = Field(default=64, ge=1)
    prefix_len: int = Field(default=0, ge=0)  # prefix: shared tokens
    num_prefixes: int = Field(default=4, ge=1)  # prefix: distinct shared prefixes

    @model_validator(mode="after")
    def _prefix(self) -> Workload:
        if self.kind == "prefix" and self.prefix_len == 0:
            raise ValueError(f"workload {self.name}: kind prefix needs prefix_len > 0")
        return self


class Prices(_Strict):
    """USD list prices: per GPU-hour (by GPU key, "cpu" for a CPU box), an API's per 1M tokens, an SRE's
    fully loaded cost per year (the playbook's break-even: API spend > GPU spend + 0.5 SRE)."""

    gpu_per_hour: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    api_per_1m_input: float = Field(default=0.50, ge=0)
    api_per_1m_output: float = Field(default=1.50, ge=0)
    sre_per_year: float = Field(default=250_000.0, ge=0)
    sre_fte: float = Field(default=0.5, ge=0)

    @field_validator("gpu_per_hour")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, p in v.items() if p <= 0]
        if bad:
            raise ValueError(f"prices must be positive USD per hour; bad: {', '.join(bad)}")
        return v


class BenchConfig(_Strict):
    workloads: list[Workload] = [Workload(name="random"), Workload(name="prefix", kind="prefix", prefix_len=1024,
                                                                   input_len=128)]
    start: int = Field(default=1, ge=1)  # first load of the sweep (concurrency)
    max_load: int = Field(default=256, ge=1)  # the sweep never goes past this
    prompts_per_load: int = Field(default=4, ge=1)  # requests per unit of concurrency in a level
    min_prompts: int = Field(default=32, ge=1)  # enough requests for a p95 that means something
    warmup_prompts: int = Field(default=8, ge=0)  # sent first, not counted (caches, CUDA graphs, allocator)
    # every level lasts at least this long (its request count sized from the rate already measured), so its
    # throughput and percentiles are not the noise of a sub-second burst
    min_level_seconds: float = Field(default=20.0, ge=0)
    repeats: int = Field(default=5, ge=2)  # capacity repeats, and interleaved pairs per look of the ratio
    # the throughput ratio is group-sequential: up to `pair_looks` looks of `repeats` pairs, stopped at the first
    # look whose repeated interval decides the gate's margin (1: a fixed `repeats` pairs)
    pair_looks: int = Field(default=4, ge=1)
    pair_spending: Spending = "obf"  # Lan-DeMets spending of the ratio's looks
    level: float = Field(default=0.90, gt=0, lt=1)  # two-sided level of the capacity / ratio intervals
    saturation_growth: float = Field(default=2.0, gt=1)  # queue time of a level's last third over its first
    seed: int = 0
    context_len: int | None = Field(default=None, ge=1)  # "max sequences at L": None = the served context
    slo: SLO = SLO()
    prices: Prices = Prices()
    hardware: str | None = None  # price key; default: the detected GPU, or "cpu"
    scrape_interval_s: float = Field(default=0.5, gt=0)
    prometheus: bool = True  # a real Prometheus scrapes the servers during the sweep (Debian `prometheus`)

    def pair_design(self) -> tuple[int, ...]:
        """Cumulative pair counts at the ratio's looks."""
        return tuple(self.repeats * (j + 1) for j in range(self.pair_looks))

    def num_prompts(self, load: int, rps_per_load: float | None = None) -> int:
        """Requests for a level at `load`: enough for a p95 and, given the request rate per unit of load seen so
        far, for `min_level_seconds`."""
        timed = math.ceil(rps_per_load * load * self.min_level_seconds) if rps_per_load else 0
        return max(self.min_prompts, self.prompts_per_load * load, timed)

    @model_validator(mode="after")
    def _loads(self) -> BenchConfig:
        if self.start > self.max_load:
            raise ValueError("start must be <= max_load")
        if not self.workloads or len({w.name for w in self.workloads}) != len(self.workloads):
            raise ValueError("workloads must be a non-empty list with distinct names")
        return self


def load_bench_config(path: Path | None, max_load: int | None = None) -> BenchConfig:
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
    if max_load is not None:
        data["max_load"] = max_load
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(f"bench config {path or '(defaults)'}", err)) from None


# --- the sweep: double, then bisect -----------------------------------------------------------------------

def next_load(history: list[tuple[int, bool]], *, start: int, max_load: int) -> int | None:
    """The next load to try, or None when the sweep is done: double from `start` while levels pass, then bisect
    between the last that passed and the first that failed (loads are integers; done when they are adjacent)."""
    if not history:
        return start
    passed = [load for load, ok in history if ok]
    failed = [load for load, ok in history if not ok]
    best = max(passed) if passed else None
    worst = min((f for f in failed if best is None or f > best), default=None)
    if worst is None:
        if best is None:
            return None
        nxt = min(best * 2, max_load)
        return nxt if nxt > best else None
    if best is None:  # the first load already fails the SLO: no capacity
        return None
    if worst - best <= 1:
        return None
    return (best + worst) // 2


def capacity_of(history: list[tuple[int, bool]]) -> int | None:
    passed = [load for load, ok in history if ok]
    failed = [load for load, ok in history if not ok]
    good = [p for p in passed if not any(f <= p for f in failed)]
    return max(good) if good else None


# --- /metrics ----------------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, Any]:
    """The operator signals from a Prometheus text page (summed over label sets)."""
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


def summarize_scrapes(first: dict[str, Any], scrapes: list[dict[str, Any]], growth: float = 2.0) -> dict[str, Any]:
    """Peak/mean of the gauges over a level, the queue-time histogram of just that level's requests, and
    whether queue time was growing across it (its last third's mean over its first third's, x `growth`)."""
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
    out["queue_growing"] = queue_growing([first, *scrapes], growth)
    return out


def queue_growing(scrapes: list[dict[str, Any]], growth: float) -> bool:
    """Over-saturation: the mean queue time of the requests finishing in the level's last third exceeds
    `growth` x that of its first third (and 10 ms: noise on an idle queue is not growth)."""
    pts = [(s.get("queue_time_sum") or 0.0, s.get("queue_time_count") or 0.0) for s in scrapes]
    if len(pts) < 6:
        return False
    third = len(pts) // 3

    def mean(a: tuple[float, float], b: tuple[float, float]) -> float | None:
        dn = b[1] - a[1]
        return (b[0] - a[0]) / dn if dn > 0 else None

    early, late = mean(pts[0], pts[third]), mean(pts[-third - 1], pts[-1])
    return early is not None and late is not None and late > max(growth * early, 0.010)


# --- SLO, capacity, ratio, cost ------------------------------------------------------------------------------

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


def t_interval(values: list[float], level: float) -> tuple[float, float, float]:
    """Mean and two-sided `level` Student-t interval of repeated measurements."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def capacity_summary(load: int | None, repeats: list[dict[str, Any]], *, price_per_hour: float, gpus: int,
                     level: float, load_kind: str = "concurrency") -> dict[str, Any]:
    """Capacity at the SLO: the load, its output tok/s over the repeated runs with an interval, and the cost
    per 1M output tokens (price x GPUs) with the interval that implies."""
    if load is None or not repeats:
        return {"load": None, "load_kind": load_kind}
    tps = [float(r["output_throughput"]) for r in repeats]
    mean, lo, hi = t_interval(tps, level)
    hourly = price_per_hour * max(gpus, 1)
    cost = cost_per_million(hourly, mean)
    return {"load": load, "load_kind": load_kind, "output_tokens_per_s": mean, "output_tokens_per_s_ci": [lo, hi],
            "repeats": len(tps), "level": level, "gpus": gpus, "price_per_hour": hourly,
            "usd_per_1m_output_tokens": cost,
            "usd_per_1m_output_tokens_ci": [cost_per_million(hourly, hi) if hi > 0 else None,
                                            cost_per_million(hourly, lo) if lo > 0 else None],
            "requests_per_s": sum(float(r["request_throughput"]) for r in repeats) / len(repeats),
            "max_num_seqs": load}


def ratio_interval(pairs: list[tuple[float, float]], level: float, *, looks: tuple[int, ...] | None = None,
                   spending: Spending = "obf", margin: float | None = None) -> dict[str, Any] | None:
    """Throughput ratio variant/reference from interleaved pairs (A B A B ...): each pair's log ratio, a t
    interval over pairs (drift between pairs cancels within each), back-transformed.

    With `looks` (cumulative pair counts) and the policy's throughput `margin`, the group-sequential form: the
    repeated t interval (qgcore.sequential.t_sequential) at the first look that excludes 1 - margin, else at
    the last complete look; `settled` says no more pairs are needed. Its lower end clears 1 - margin with
    probability <= (1 - level) / 2 over all looks when the true ratio is 1 - margin, as one fixed-n interval
    would, so the gate decides it as it is."""
    from scipy.stats import t

    valid = [(r, v) for r, v in pairs if r > 0 and v > 0]
    logs = [math.log(v / r) for r, v in valid]
    if len(logs) < 2:
        return None
    design = looks if looks and margin is not None and len(logs) >= looks[0] else (len(logs),)
    null = math.log(1 - margin) if margin is not None else 0.0
    got = t_sequential(np.array([logs]), design, spending, (1 - level) / 2, null)
    j = int(got["look"][0])
    n, mean, half, crit = design[j], float(got["mean"][0]), float(got["half"][0]), float(got["crit"][0])
    settled = bool(got["outcome"][0]) or j == len(design) - 1  # no margin: one look, the last
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half), "level": level,
            "pairs": n, "look": j + 1, "looks": len(design), "spending": spending,
            "nominal_level": 1 - 2 * float(t.sf(crit, n - 1)), "settled": settled,
            "per_pair": [v / r for r, v in valid[:n]]}


def max_sequences(kv_cache_tokens: int | None, context_len: int) -> float | None:
    """How many sequences of `context_len` tokens fit in the KV cache at once."""
    if not kv_cache_tokens or context_len <= 0:
        return None
    return kv_cache_tokens / context_len


def price_for(config: BenchConfig, hardware: dict[str, Any]) -> tuple[str, float]:
    key = config.hardware
    prices = config.prices.gpu_per_hour
    if key is None:
        gpu = str(hardware.get("gpu") or "")
        key = next((k for k in sorted(prices, key=len, reverse=True) if k != "cpu" and k.lower() in gpu.lower()),
                   "cpu")
    if key not in prices:
        raise ConfigError(f"no price for hardware '{key}': add it under prices.gpu_per_hour in the bench config")
    return key, prices[key]


def break_even(usd_per_1m_output: float | None, gpus: int, price_per_hour: float, prices: Prices,
               output_tokens_per_s: float | None, in_out_ratio: float) -> dict[str, Any]:
    """The monthly volume above which self-hosting beats the API, by the playbook's rule: API spend >
    GPU spend + sre_fte x an SRE. GPU spend scales with the replicas the volume needs at capacity."""
    if not output_tokens_per_s or output_tokens_per_s <= 0:
        return {"monthly_output_tokens": None, "rule": "no capacity measured"}
    api_per_out = prices.api_per_1m_output + in_out_ratio * prices.api_per_1m_input  # $ per 1M output tokens
    per_replica_month = output_tokens_per_s * 3600 * 730  # output tokens one replica serves a month
    gpu_month = price_per_hour * max(gpus, 1) * 730
    sre_month = prices.sre_per_year * prices.sre_fte / 12
    # volume V (1M output tokens): API = V x api; self-host = ceil(V / cap) x gpu_month + sre_month. Smallest V
    # where API wins, scanning replica counts (the step function crosses the API line once per step at most)
    for replicas in range(1, 10_000):
        lo = (replicas - 1) * per_replica_month / 1e6
        hi = replicas * per_replica_month / 1e6
        self_host = replicas * gpu_month + sre_month
        v = self_host / api_per_out if api_per_out > 0 else math.inf
        if lo < v <= hi:
            return {"monthly_output_tokens": v * 1e6, "replicas": replicas, "api_usd_per_1m_output_equiv": api_per_out,
                    "gpu_usd_per_month_per_replica": gpu_month, "sre_usd_per_month": sre_month,
                    "rule": f"API spend > GPU spend + {prices.sre_fte:g} SRE",
                    "self_host_usd_per_1m_output_at_capacity": usd_per_1m_output}
        if v <= lo:
            break
    return {"monthly_output_tokens": None, "rule": f"API spend > GPU spend + {prices.sre_fte:g} SRE",
            "note": "self-hosting never costs less than the API at these prices"}


def fit_table(weights_bytes: int | None, kv_bytes_per_token: int | None, context: int, concurrency: int | None,
              tensor_parallel: int) -> list[dict[str, Any]]:
    """Which GPUs hold the variant at the measured context and concurrency, memory only: weights plus KV for
    `concurrency` sequences of `context` tokens, over 0.85 of each GPU x the TP size."""
    if not weights_bytes or not kv_bytes_per_token:
        return []
    need = weights_bytes + kv_bytes_per_token * context * max(concurrency or 1, 1)
    out = []
    for g in GPUS.values():
        have = g.memory_gib * 2**30 * 0.85 * tensor_parallel
        out.append({"gpu": g.name, "memory_gib": g.memory_gib, "tensor_parallel": tensor_parallel,
                    "need_bytes": need, "fits": need <= have, "label": "memory only"})
    return out
