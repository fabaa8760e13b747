"""A load run that fails midway keeps the levels it finished and says so (no server needed here)."""

from pathlib import Path

import evals.bench_stage as bs
from evals.perf import BenchConfig
from quantize.recipe import load_recipe
from tests.unit.test_report import _manifest


class FakeServer:
    def __init__(self, checkpoint, *, name, log_path, config, scheme=None):
        self.name, self.cuda = name, False
        self.proc = type("P", (), {"pid": 1})()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def alive(self):
        return True

    def provenance(self):
        return {"engine": "vllm"}

    def startup_info(self):
        return {"kv_cache_tokens": 4096}

    def log_tail(self):
        return ["last line"]


def test_failure_midway_keeps_finished_levels(tmp_path: Path, monkeypatch):
    calls = []

    def fake_level(server, checkpoint, cfg, c, out_dir):
        calls.append(c)
        if c == 4:
            raise RuntimeError("vllm bench serve at concurrency 4 wrote no result: boom")
        return {"concurrency": c, "output_throughput": 50.0, "request_throughput": 1.0, "p95_ttft_ms": 100.0,
                "p95_itl_ms": 10.0, "failed": 0}

    monkeypatch.setattr(bs, "VllmServer", FakeServer)
    monkeypatch.setattr(bs, "run_level", fake_level)
    monkeypatch.setattr(bs, "vllm_version", lambda: "test")
    m = _manifest("bf16", 1000)
    run = bs.bench_variant(m, tmp_path, BenchConfig(concurrency=[1, 4, 16]), force=True)
    assert calls == [1, 4]
    assert run.status == "failed" and "completed levels kept" in run.reason and "concurrency 4" in run.reason
    assert [lv["concurrency"] for lv in run.levels] == [1]
    assert run.slo_point["concurrency"] == 1  # what was measured is still usable
    assert run.server_log_tail == ["last line"]
    assert load_recipe("bf16").name == m.recipe
