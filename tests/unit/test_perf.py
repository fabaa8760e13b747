"""Bench arithmetic (evals.perf) on synthetic inputs with known answers: the capacity sweep, /metrics,
queue growth, capacity and ratio intervals, cost, break-even and the memory fit table."""

import math
import random

import pytest

from evals.perf import (
    SLO,
    BenchConfig,
    Prices,
    Workload,
    break_even,
    capacity_of,
    capacity_summary,
    cost_per_million,
    fit_table,
    histogram_bound,
    load_bench_config,
    max_sequences,
    meets_slo,
    next_load,
    parse_metrics,
    price_for,
    queue_growing,
    ratio_interval,
    summarize_scrapes,
)
from qgcore.device import GPUS
from qgcore.errors import ConfigError

# --- the sweep ----------------------------------------------------------------------------------------------


def _latency_level(load: int, capacity: float) -> dict:
    """A server whose p95 TTFT grows linearly with load and crosses the default SLO (3 s) at `capacity`
    (ITL stays well inside its SLO): the level meets the SLO exactly when load <= capacity."""
    return {"concurrency": load, "p95_ttft_ms": 3000.0 * load / capacity, "p95_itl_ms": 20.0, "failed": 0}


def _sweep(capacity: float, *, start: int, max_load: int) -> list[tuple[int, bool]]:
    history: list[tuple[int, bool]] = []
    while (load := next_load(history, start=start, max_load=max_load)) is not None:
        history.append((load, meets_slo(_latency_level(load, capacity), SLO())))
        assert len(history) < 64, "the sweep does not stop on its own"
    return history


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 7.5, 37, 64, 100, 255, 256, 1000])
@pytest.mark.parametrize(("start", "max_load"), [(1, 256), (3, 256), (1, 48)])
def test_sweep_finds_the_capacity_and_never_exceeds_max_load(capacity, start, max_load):
    history = _sweep(capacity, start=start, max_load=max_load)
    loads = [load for load, _ in history]
    assert max(loads) <= max_load and min(loads) >= start
    assert len(set(loads)) == len(loads)  # no level is run twice
    # doubling to max_load then bisecting an integer interval: about 2 log2(max_load) levels at most
    assert len(history) <= 2 * math.ceil(math.log2(max_load)) + 2
    true_cap = min(math.floor(capacity), max_load)
    if true_cap < start:
        assert capacity_of(history) is None and history == [(start, False)]
    else:
        # integer loads: the bisection stops only once a pass and a fail are adjacent, so the capacity is exact
        assert capacity_of(history) == true_cap
        if true_cap < max_load:
            assert (true_cap + 1, False) in history


def test_sweep_stops_at_max_load_when_everything_passes():
    assert next_load([], start=4, max_load=8) == 4
    assert next_load([(4, True)], start=4, max_load=8) == 8
    assert next_load([(4, True), (8, True)], start=4, max_load=8) is None
    assert next_load([(4, True), (8, False)], start=4, max_load=8) == 6
    assert next_load([(8, True)], start=8, max_load=8) is None
    assert next_load([(5, True), (6, False)], start=5, max_load=8) is None  # adjacent: done


def test_capacity_ignores_a_pass_above_a_failure():
    assert capacity_of([(1, True), (2, True), (4, False), (3, True)]) == 3
    assert capacity_of([(1, True), (2, False), (3, True)]) == 1  # noisy pass above a miss does not count
    assert capacity_of([(1, False)]) is None
    assert capacity_of([]) is None


def test_meets_slo_needs_both_percentiles_and_no_failed_requests():
    slo = SLO(ttft_p95_s=3.0, itl_p95_ms=50.0)
    assert meets_slo({"p95_ttft_ms": 3000.0, "p95_itl_ms": 50.0, "failed": 0}, slo)
    assert not meets_slo({"p95_ttft_ms": 3000.1, "p95_itl_ms": 10.0, "failed": 0}, slo)
    assert not meets_slo({"p95_ttft_ms": 100.0, "p95_itl_ms": 50.1, "failed": 0}, slo)
    assert not meets_slo({"p95_ttft_ms": 100.0, "p95_itl_ms": 10.0, "failed": 1}, slo)
    assert not meets_slo({"p95_ttft_ms": None, "p95_itl_ms": 10.0}, slo)


def test_level_size_covers_min_level_seconds():
    cfg = BenchConfig(min_prompts=32, prompts_per_load=4, min_level_seconds=20)
    assert cfg.num_prompts(2) == 32  # the p95 floor
    assert cfg.num_prompts(16) == 64  # 4 per unit of load
    assert cfg.num_prompts(4, rps_per_load=1.5) == 120  # 1.5 req/s per load x 4 x 20 s
    assert cfg.num_prompts(4, rps_per_load=0.01) == 32  # a slow server: the floor still holds
    assert BenchConfig(min_level_seconds=0).num_prompts(4, rps_per_load=1.5) == 32


# --- /metrics and queue growth ------------------------------------------------------------------------------

PROM = """# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 8.0
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:request_queue_time_seconds_bucket{engine="0",le="1.0",model_name="m"} 9.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 10.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 4.5
"""


def test_parse_metrics_reads_the_operator_signals():
    m = parse_metrics(PROM)
    assert m["kv_cache_usage_perc"] == 0.25
    assert m["num_requests_waiting"] == 3.0 and m["num_requests_running"] == 8.0
    assert m["queue_time_count"] == 10.0 and m["queue_time_sum"] == 4.5
    assert m["queue_time_buckets"] == {0.1: 4.0, 1.0: 9.0, float("inf"): 10.0}
    empty = parse_metrics("# nothing\n")
    assert empty["kv_cache_usage_perc"] is None and empty["queue_time_buckets"] == {}


def test_parse_metrics_sums_two_engines():
    second = PROM.replace('engine="0"', 'engine="1"')
    second = "\n".join(line for line in second.splitlines() if not line.startswith("#"))
    m = parse_metrics(PROM + second + "\n")
    assert m["kv_cache_usage_perc"] == pytest.approx(0.5)
    assert m["num_requests_waiting"] == 6.0 and m["num_requests_running"] == 16.0
    assert m["queue_time_count"] == 20.0 and m["queue_time_sum"] == pytest.approx(9.0)
    assert m["queue_time_buckets"] == {0.1: 8.0, 1.0: 18.0, float("inf"): 20.0}


def test_histogram_bound_is_the_bucket_holding_the_quantile():
    b = {0.1: 4.0, 1.0: 9.0, float("inf"): 10.0}
    assert histogram_bound(0.2, b) == 0.1  # rank 2 of 10 lies in the first bucket
    assert histogram_bound(0.4, b) == 0.1
    assert histogram_bound(0.65, b) == 1.0
    assert histogram_bound(1.0, b) == float("inf")
    assert histogram_bound(0.5, {}) is None
    assert histogram_bound(0.5, {1.0: 0.0, float("inf"): 0.0}) is None


def test_summarize_uses_only_this_levels_requests():
    first = parse_metrics(PROM)
    later = dict(first, queue_time_count=14.0, queue_time_sum=6.5, kv_cache_usage_perc=0.5,
                 queue_time_buckets={0.1: 8.0, 1.0: 13.0, float("inf"): 14.0})
    s = summarize_scrapes(first, [first, later])
    q = s["request_queue_time_seconds"]
    assert q["count"] == 4.0 and q["mean"] == pytest.approx(0.5)
    assert q["p50_le"] == 0.1 and q["max_le"] == 0.1
    assert s["kv_cache_usage_perc"]["peak"] == 0.5 and s["kv_cache_usage_perc"]["mean"] == pytest.approx(0.375)
    assert s["kv_cache_usage_perc"]["samples"] == 2
    assert s["queue_growing"] is False  # three points: too few to call growth
    idle = summarize_scrapes({}, [])
    assert idle["request_queue_time_seconds"]["mean"] is None and idle["kv_cache_usage_perc"]["peak"] is None


def _scrapes(per_request_queue_s: list[float], finished_per_scrape: int = 10) -> list[dict]:
    """Cumulative queue-time sum/count as /metrics reports them, given each interval's per-request queue time."""
    total, count, out = 0.0, 0.0, [{"queue_time_sum": 0.0, "queue_time_count": 0.0}]
    for q in per_request_queue_s:
        total += q * finished_per_scrape
        count += finished_per_scrape
        out.append({"queue_time_sum": total, "queue_time_count": count})
    return out


def test_a_growing_queue_is_detected():
    assert queue_growing(_scrapes([0.05 * (i + 1) for i in range(12)]), 2.0)  # 0.05 s -> 0.6 s
    assert not queue_growing(_scrapes([0.4] * 12), 2.0)  # long but steady: saturated, not over-saturated
    assert not queue_growing(_scrapes([0.0005 * (i + 1) for i in range(12)]), 2.0)  # 12x, but under 10 ms
    assert not queue_growing(_scrapes([0.05 * (i + 1) for i in range(4)]), 2.0)  # too few scrapes to tell
    assert not queue_growing(_scrapes([0.1, 0.1, 0.1, 0.1, 0.19, 0.19, 0.19, 0.19]), 2.0)  # under 2x
    assert queue_growing(_scrapes([0.1, 0.1, 0.1, 0.1, 0.19, 0.19, 0.19, 0.19]), 1.5)
    # idle start (no request finished in the first third): no baseline, no verdict
    idle = [{"queue_time_sum": 0.0, "queue_time_count": 0.0}] * 6
    busy = [{"queue_time_sum": 5.0 * (i + 1), "queue_time_count": 10.0 * (i + 1)} for i in range(6)]
    assert not queue_growing(idle + busy, 2.0)


def test_summarize_flags_growth_over_the_level():
    scrapes = _scrapes([0.05 * (i + 1) for i in range(12)])
    assert summarize_scrapes(scrapes[0], scrapes[1:])["queue_growing"] is True
    steady = _scrapes([0.4] * 12)
    assert summarize_scrapes(steady[0], steady[1:])["queue_growing"] is False


# --- capacity, ratio, cost ----------------------------------------------------------------------------------

def test_capacity_summary_interval_and_cost():
    repeats = [{"output_throughput": t, "request_throughput": t / 50} for t in (90.0, 100.0, 110.0)]
    s = capacity_summary(12, repeats, price_per_hour=2.4, gpus=2, level=0.90)
    assert s["load"] == 12 and s["repeats"] == 3 and s["max_num_seqs"] == 12
    assert s["output_tokens_per_s"] == pytest.approx(100.0)
    half = 2.919986 * 10.0 / math.sqrt(3)  # t_{0.95, 2 df} x sd 10 / sqrt(3)
    assert s["output_tokens_per_s_ci"] == pytest.approx([100.0 - half, 100.0 + half], rel=1e-5)
    assert s["price_per_hour"] == pytest.approx(4.8)  # two GPUs
    assert s["usd_per_1m_output_tokens"] == pytest.approx(4.8 / (100 * 3600) * 1e6)
    lo_cost, hi_cost = s["usd_per_1m_output_tokens_ci"]  # more tokens/s, cheaper: the bounds swap
    assert lo_cost == pytest.approx(4.8 / ((100 + half) * 3600) * 1e6)
    assert hi_cost == pytest.approx(4.8 / ((100 - half) * 3600) * 1e6)
    assert s["requests_per_s"] == pytest.approx(2.0)
    assert capacity_summary(None, repeats, price_per_hour=2.4, gpus=1, level=0.9)["load"] is None
    assert capacity_summary(4, [], price_per_hour=2.4, gpus=1, level=0.9)["load"] is None
    # a CPU box (no GPUs) is priced as one unit
    assert capacity_summary(4, repeats, price_per_hour=0.1, gpus=0, level=0.9)["price_per_hour"] == 0.1


def _pairs(ratio: float, n: int, rng: random.Random, noise: float = 0.05) -> list[tuple[float, float]]:
    """Interleaved (reference, variant) throughputs with a slow drift shared within each pair plus noise."""
    out = []
    for i in range(n):
        drift = 100.0 * (1 - 0.4 * i / max(n - 1, 1))  # the machine slows down 40% over the run
        out.append((drift * math.exp(rng.gauss(0, noise)), ratio * drift * math.exp(rng.gauss(0, noise))))
    return out


def test_ratio_interval_covers_the_true_ratio_at_about_its_level():
    rng = random.Random(7)
    trials = 400
    covered = 0
    for _ in range(trials):
        r = ratio_interval(_pairs(0.8, 5, rng), 0.90)
        assert r is not None and r["low"] <= r["ratio"] <= r["high"] and r["pairs"] == 5
        covered += r["low"] <= 0.8 <= r["high"]
    assert 0.85 <= covered / trials <= 0.95  # nominal 0.90; binomial sd ~0.015


def test_ratio_interval_narrows_with_more_pairs():
    rng = random.Random(3)

    def mean_width(n: int) -> float:
        widths = []
        for _ in range(50):
            r = ratio_interval(_pairs(1.2, n, rng), 0.90)
            widths.append(r["high"] - r["low"])
        return sum(widths) / len(widths)

    w3, w10, w40 = mean_width(3), mean_width(10), mean_width(40)
    assert w3 > w10 > w40


def test_drift_between_pairs_cancels_within_each():
    pairs = _pairs(0.75, 6, random.Random(0), noise=0.0)  # 40% drift, no noise
    r = ratio_interval(pairs, 0.90)
    assert r["ratio"] == pytest.approx(0.75) and r["low"] == pytest.approx(0.75) and r["high"] == pytest.approx(0.75)
    assert r["per_pair"] == pytest.approx([0.75] * 6)
    # the same numbers unpaired (means over all runs) would also give 0.75 here; what pairing buys is the width
    assert ratio_interval(pairs[:1], 0.9) is None  # one pair: no interval


def test_ratio_interval_skips_a_pair_with_no_throughput():
    r = ratio_interval([(0.0, 50.0), (100.0, 80.0), (100.0, 82.0)], 0.9)
    assert r is not None and r["pairs"] == 2 and 0.8 <= r["ratio"] <= 0.82


def test_cost_and_capacity_arithmetic():
    assert cost_per_million(2.40, 1000) == pytest.approx(2.40 / 3.6e6 * 1e6)
    assert cost_per_million(2.40, 0) is None
    assert max_sequences(262144, 2048) == 128
    assert max_sequences(None, 2048) is None
    assert max_sequences(1000, 0) is None


def test_break_even_hand_computed():
    prices = Prices(api_per_1m_output=1.5, api_per_1m_input=0.5, sre_per_year=240_000, sre_fte=0.5)
    # API: 1.5 + 2 x 0.5 = 2.5 $ per 1M output tokens (two input tokens per output token)
    # one replica at 1000 tok/s serves 1000 x 3600 x 730 = 2628 M tokens a month for 2 $/h x 730 = 1460 $
    # SRE: 240k x 0.5 / 12 = 10000 $/month. One replica: break-even at (1460 + 10000) / 2.5 = 4584 M > 2628 M:
    # the volume needs two replicas: (2 x 1460 + 10000) / 2.5 = 5168 M, inside (2628, 5256]
    b = break_even(1.23, 1, 2.0, prices, 1000.0, 2.0)
    assert b["replicas"] == 2
    assert b["monthly_output_tokens"] == pytest.approx(5168e6)
    assert b["api_usd_per_1m_output_equiv"] == pytest.approx(2.5)
    assert b["gpu_usd_per_month_per_replica"] == pytest.approx(1460.0)
    assert b["sre_usd_per_month"] == pytest.approx(10_000.0)
    assert b["self_host_usd_per_1m_output_at_capacity"] == 1.23 and "0.5 SRE" in b["rule"]
    # at that volume the API bill equals the self-hosting bill
    assert b["monthly_output_tokens"] / 1e6 * 2.5 == pytest.approx(2 * 1460 + 10_000)
    # two GPUs per replica: 2920 $/month each; (2920 + 10000) / 2.5 = 5168 M > 2628 M, (2 x 2920 + 10000) / 2.5 =
    # 6336 M > 5256 M, (3 x 2920 + 10000) / 2.5 = 7504 M inside (5256, 7884]: three replicas
    two = break_even(None, 2, 2.0, prices, 1000.0, 2.0)
    assert two["replicas"] == 3 and two["monthly_output_tokens"] == pytest.approx(7504e6)


def test_break_even_never_and_unmeasured():
    prices = Prices(api_per_1m_output=1.5, api_per_1m_input=0.5, sre_per_year=240_000, sre_fte=0.5)
    # 10 tok/s: a replica's month of tokens (26.3 M) costs 65.7 $ at the API but 1460 $ of GPU
    never = break_even(None, 1, 2.0, prices, 10.0, 2.0)
    assert never["monthly_output_tokens"] is None and "never" in never["note"]
    assert break_even(None, 1, 2.0, prices, None, 2.0) == {"monthly_output_tokens": None,
                                                            "rule": "no capacity measured"}
    assert break_even(None, 1, 2.0, prices, 0.0, 2.0)["monthly_output_tokens"] is None


def test_fit_table_hand_computed():
    weights, per_token = 10 * 2**30, 128 * 1024  # 10 GiB; 128 KiB of KV per token
    rows = {r["gpu"]: r for r in fit_table(weights, per_token, 4096, 8, 1)}
    assert set(rows) == set(GPUS)
    need = 14 * 2**30  # 10 GiB + 128 KiB x 4096 tokens x 8 sequences = 10 + 4 GiB
    assert all(r["need_bytes"] == need and r["label"] == "memory only" for r in rows.values())
    assert not rows["T4"]["fits"]  # 16 GiB x 0.85 = 13.6 GiB < 14
    assert rows["A10"]["fits"] and rows["A100"]["fits"]  # 24 x 0.85 = 20.4 GiB
    assert {r["gpu"]: r["fits"] for r in fit_table(weights, per_token, 4096, 8, 2)}["T4"]  # 27.2 GiB at TP 2
    one = {r["gpu"]: r for r in fit_table(weights, per_token, 4096, None, 1)}  # no capacity: one sequence
    assert one["T4"]["need_bytes"] == weights + per_token * 4096 and one["T4"]["fits"]
    assert fit_table(None, per_token, 4096, 8, 1) == [] and fit_table(weights, None, 4096, 8, 1) == []


# --- configuration ------------------------------------------------------------------------------------------

def test_price_lookup():
    cfg = BenchConfig()
    assert price_for(cfg, {"gpu": "NVIDIA H100 80GB HBM3"}) == ("H100", GPUS["H100"].usd_per_hour)
    assert price_for(cfg, {"gpu": "NVIDIA H200"})[0] == "H200"
    assert price_for(cfg, {"gpu": "NVIDIA A10G"})[0] == "A10G"  # longest key wins over A10
    assert price_for(cfg, {"device": "cpu"})[0] == "cpu"
    with pytest.raises(ConfigError, match="no price for hardware 'TPU'"):
        price_for(BenchConfig(hardware="TPU"), {})


def test_shipped_bench_configs_load():
    from evals.bench_stage import CPU_CONFIG, DEMO_CPU_CONFIG

    for path in (CPU_CONFIG, DEMO_CPU_CONFIG):
        cfg = load_bench_config(path)
        assert [w.kind for w in cfg.workloads] == ["random", "prefix"] and cfg.start <= cfg.max_load
    assert load_bench_config(DEMO_CPU_CONFIG, 4).max_load == 4  # --max-load overrides the file


@pytest.mark.parametrize(("text", "message"), [
    ("slo:\n  ttft_p95: 3\n", "slo.ttft_p95: unknown key"),
    ("prices:\n  gpu_per_hour: {H100: -1}\n", "prices must be positive"),
    ("slo: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "must be a YAML mapping"),
    ("start: 64\nmax_load: 8\n", "start must be <= max_load"),
    ("workloads: []\n", "non-empty list with distinct names"),
    ("workloads: [{name: a}, {name: a}]\n", "distinct names"),
    ("workloads: [{name: p, kind: prefix}]\n", "kind prefix needs prefix_len > 0"),
    ("workloads: [{name: p, kind: chat}]\n", "workloads.0.kind"),
    ("repeats: 1\n", "repeats"),
    ("level: 1.5\n", "level"),
])
def test_bench_config_errors(tmp_path, text, message):
    bad = tmp_path / "b.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_bench_config(bad)
    assert str(bad) in str(err.value)  # the message names the file


def test_bench_config_missing_file_and_defaults(tmp_path):
    with pytest.raises(ConfigError, match="bench config not found"):
        load_bench_config(tmp_path / "nope.yaml")
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    assert load_bench_config(empty) == BenchConfig()
    with pytest.raises(ConfigError, match="max_load"):
        load_bench_config(None, 0)
    assert Workload(name="p", kind="prefix", prefix_len=8).num_prefixes == 4


def test_bench_perf_gate_decides_with_the_gates_own_throughput_check():
    """`make bench-perf-gate` counts what the gate would say about two identical servers' pairs."""
    from quantgate.bench_perf_gate import decide

    def ratio(lo: float, hi: float) -> dict:
        return {"ratio": (lo + hi) / 2, "low": lo, "high": hi, "level": 0.9, "pairs": 5, "per_pair": []}

    assert decide(ratio(0.97, 1.03), 2, 2) == "pass"  # shown >= 0.95x
    assert decide(ratio(0.80, 0.93), 2, 2) == "fail"  # shown below
    assert decide(ratio(0.93, 1.02), 2, 2) == "inconclusive"  # a false reject for identical servers
    assert decide(None, 2, 2) == "fail"  # the variant measured no throughput at capacity


def _cfg(name: str | None) -> BenchConfig:
    from evals.bench_stage import CPU_CONFIG, DEMO_CPU_CONFIG

    return {None: BenchConfig(), "cpu": load_bench_config(CPU_CONFIG), "demo": load_bench_config(DEMO_CPU_CONFIG),
            "tp2-test": BenchConfig(repeats=2, pair_looks=2)}[name]  # tests/e2e/test_bench.py's design


def _fake_pairs(ratio: float, sd: float, rng: random.Random):
    """A reference at 100 tok/s and a variant at `ratio` x with log-normal noise per pair, as level records."""
    return (lambda i: {"output_throughput": 100.0},
            lambda i: {"output_throughput": 100.0 * ratio * math.exp(rng.gauss(0, sd))})


@pytest.mark.parametrize("name", [None, "cpu", "demo", "tp2-test"])
def test_the_throughput_check_false_passes_at_most_alpha_at_every_shipped_design(name):
    """The promise of the performance check: a variant whose true throughput is at the floor (1 - margin) is
    passed with probability <= (1 - level) / 2 over all its looks, at each design the tool ships (GPU default,
    CPU, demo). 100,000 null paths per design through t_sequential (what ratio_interval decides with; the
    next test shows they agree path by path), at two noise levels since the promise must not depend on it."""
    import numpy as np

    from qgcore.sequential import t_sequential

    cfg = _cfg(name)
    alpha, looks, runs = (1 - cfg.level) / 2, cfg.pair_design(), 100_000
    se = math.sqrt(alpha * (1 - alpha) / runs)
    rng = np.random.default_rng(99)  # not the boundaries' calibration seed
    for sd in (0.02, 0.07):
        x = rng.normal(math.log(0.95), sd, (runs, looks[-1]))
        got = t_sequential(x, looks, cfg.pair_spending, alpha, math.log(0.95))
        rate = float(np.mean(got["outcome"] == 1))
        assert rate <= alpha + 3 * se, (name, sd, rate)
        assert rate >= alpha - 0.006, (name, sd, rate)  # and not needlessly conservative (the calibration works)


def test_the_vectorised_rule_is_the_bench_stages_decision_path_by_path():
    """run_pairs (the bench stage's loop: looks of `repeats` pairs, stopping when settled) and ratio_interval on
    each simulated path reach the same look and outcome as the vectorised t_sequential the simulations use."""
    import numpy as np

    from evals.bench_stage import run_pairs
    from qgcore.sequential import t_sequential

    cfg = _cfg("cpu")
    looks, alpha, floor = cfg.pair_design(), (1 - cfg.level) / 2, math.log(0.95)
    rng = random.Random(5)
    for true in (1.0, 0.95, 0.85):
        paths = [[rng.gauss(math.log(true), 0.07) for _ in range(looks[-1])] for _ in range(150)]
        vec = t_sequential(np.array(paths), looks, cfg.pair_spending, alpha, floor)
        for k, path in enumerate(paths):
            logs = iter(path)
            ratio, levels = run_pairs(lambda i: {"output_throughput": 1.0},
                                      lambda i, logs=logs: {"output_throughput": math.exp(next(logs))}, cfg, 0.05)
            assert ratio["pairs"] == len(levels) == looks[int(vec["look"][k])] and ratio["looks"] == len(looks)
            outcome = 1 if ratio["low"] > 0.95 else -1 if ratio["high"] < 0.95 else 0
            assert outcome == vec["outcome"][k] and ratio["settled"]
            assert ratio["low"] <= ratio["ratio"] <= ratio["high"]


def test_run_pairs_stops_at_the_first_look_that_decides_and_only_with_a_margin():
    from evals.bench_stage import run_pairs

    cfg = _cfg("cpu")
    rng = random.Random(1)
    ratio, levels = run_pairs(*_fake_pairs(1.0, 0.001, rng), cfg, 0.05)  # plainly not slower: look 1
    assert (ratio["look"], ratio["pairs"], len(levels)) == (1, 5, 5) and ratio["low"] > 0.95
    ratio, levels = run_pairs(*_fake_pairs(0.5, 0.001, rng), cfg, 0.05)  # plainly slower: look 1, fails
    assert ratio["look"] == 1 and ratio["high"] < 0.95
    ratio, levels = run_pairs(*_fake_pairs(0.95, 0.05, rng), cfg, 0.05)  # at the floor: rarely settles early
    assert ratio["pairs"] == len(levels) == 5 * ratio["look"] and ratio["settled"]
    ratio, levels = run_pairs(*_fake_pairs(0.95, 0.05, rng), cfg, None)  # no margin to decide: fixed pairs
    assert (ratio["looks"], ratio["pairs"], len(levels)) == (1, 5, 5)
    # a look's repeated interval is wider than the fixed interval of the same pairs (it holds over all looks)
    fixed = ratio_interval([(100.0, 100.0 * p) for p in ratio["per_pair"]], cfg.level)
    assert fixed["high"] - fixed["low"] == pytest.approx(ratio["high"] - ratio["low"])
    pairs = [(100.0, 100.0 * math.exp(rng.gauss(0, 0.05))) for _ in range(10)]
    seq = ratio_interval(pairs, cfg.level, looks=cfg.pair_design(), margin=0.05)
    assert seq["look"] == 2 and seq["nominal_level"] > cfg.level
    assert seq["high"] - seq["low"] > ratio_interval(pairs, cfg.level)["high"] - ratio_interval(pairs, cfg.level)["low"]


def test_one_look_is_students_t_and_the_cpu_design_passes_identical_servers():
    """One look: the t boundary is Student's quantile, and the perf gate's pass rate equals an independent
    closed form (a noncentral-t tail, scipy.stats.nct). Several: the CPU design passes two identical servers
    >= 95% at the per-pair noise `make bench-perf-gate` measured here (6.4-7.1%), which a fixed 5 pairs do not."""
    from scipy.stats import nct, t

    from qgcore.sequential import t_boundaries
    from quantgate.bench_perf_gate import pass_probability

    assert t_boundaries((5,), "obf", 0.05) == pytest.approx((t.isf(0.05, 4),))
    for sd, n in ((0.03, 5), (0.07, 5), (0.05, 12)):
        cfg = BenchConfig(repeats=n, pair_looks=1)
        want = float(nct.sf(t.isf(0.05, n - 1), n - 1, -math.log(0.95) / (sd / math.sqrt(n))))
        assert abs(pass_probability(sd, cfg, 0.05)["pass"] - want) < 0.01, (sd, n, want)
    cpu = _cfg("cpu")
    for sd in (0.064, 0.071):
        got = pass_probability(sd, cpu, 0.05)
        assert got["pass"] >= 0.95 and got["mean_pairs"] < 0.75 * cpu.pair_design()[-1], (sd, got)
        assert pass_probability(sd, cpu.model_copy(update={"pair_looks": 1}), 0.05)["pass"] < 0.5


def test_the_perf_gate_pools_the_per_pair_sd_within_blocks():
    from quantgate.bench_perf_gate import pooled_log_sd

    rng = random.Random(0)
    for sd, pairs in ((0.03, 5), (0.05, 8), (0.02, 3), (0.10, 15)):
        rows = [{"ratio": {"per_pair": [math.exp(rng.gauss(0.01 * b, sd)) for _ in range(pairs)]}} for b in range(400)]
        assert abs(pooled_log_sd(rows) - sd) < 0.05 * sd  # block means drift (0.01 x b): not counted
