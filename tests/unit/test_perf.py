import pytest

from evals.perf import (
    SLO,
    BenchConfig,
    cost_per_million,
    histogram_bound,
    load_bench_config,
    max_sequences,
    parse_metrics,
    price_for,
    slo_point,
    summarize_scrapes,
)
from qgcore.errors import ConfigError

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


def test_parse_metrics_reads_the_four_signals():
    m = parse_metrics(PROM)
    assert m["kv_cache_usage_perc"] == 0.25
    assert m["num_requests_waiting"] == 3.0 and m["num_requests_running"] == 8.0
    assert m["queue_time_count"] == 10.0 and m["queue_time_sum"] == 4.5
    assert m["queue_time_buckets"] == {0.1: 4.0, 1.0: 9.0, float("inf"): 10.0}


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
    assert s["request_queue_time_seconds"]["count"] == 4.0
    assert s["request_queue_time_seconds"]["mean"] == pytest.approx(0.5)
    assert s["request_queue_time_seconds"]["p50_le"] == 0.1 and s["request_queue_time_seconds"]["max_le"] == 0.1
    assert s["kv_cache_usage_perc"]["peak"] == 0.5 and s["kv_cache_usage_perc"]["mean"] == pytest.approx(0.375)


def _level(c, tps, ttft_ms, itl_ms, failed=0):
    return {"concurrency": c, "output_throughput": tps, "request_throughput": tps / 64, "p95_ttft_ms": ttft_ms,
            "p95_itl_ms": itl_ms, "failed": failed}


def test_slo_point_is_highest_level_meeting_slo():
    levels = [_level(1, 50, 100, 10), _level(8, 300, 900, 40), _level(32, 600, 4000, 90)]
    p = slo_point(levels, SLO(), 2.40)
    assert p["concurrency"] == 8 and p["output_tokens_per_s"] == 300
    assert p["usd_per_1m_output_tokens"] == pytest.approx(2.40 / (300 * 3600) * 1e6)
    assert slo_point([_level(1, 50, 5000, 10)], SLO(), 2.4) is None
    assert slo_point([_level(1, 50, 100, 10, failed=1)], SLO(), 2.4) is None  # failed requests never meet an SLO


def test_cost_and_capacity_arithmetic():
    assert cost_per_million(2.40, 1000) == pytest.approx(0.6667, abs=1e-4)
    assert cost_per_million(2.40, 0) is None
    assert max_sequences(262144, 2048) == 128
    assert max_sequences(None, 2048) is None


def test_price_lookup():
    cfg = BenchConfig()
    assert price_for(cfg, {"gpu": "NVIDIA H100 80GB HBM3"}) == ("H100", 2.40)
    assert price_for(cfg, {"device": "cpu"})[0] == "cpu"
    with pytest.raises(ConfigError, match="no price for hardware 'TPU'"):
        price_for(BenchConfig(hardware="TPU"), {})


def test_bench_config_errors(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("slo:\n  ttft_p95: 3\n")
    with pytest.raises(ConfigError, match="slo.ttft_p95: unknown key"):
        load_bench_config(bad)
    bad.write_text("prices:\n  H100: -1\n")
    with pytest.raises(ConfigError, match="positive"):
        load_bench_config(bad)
    bad.write_text("slo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_bench_config(bad)
    with pytest.raises(ConfigError, match="comma-separated integers"):
        load_bench_config(None, "1,eight")
    assert load_bench_config(None, "32,1,8").concurrency == [1, 8, 32]
