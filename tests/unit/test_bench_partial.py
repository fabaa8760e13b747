
"""A load run that fails midway keeps the levels it finished and says so (no server needed here)."""

import os
import sys
from pathlib import Path

import pytest

import evals.bench_stage as bs
from evals.perf import BenchConfig
from quantize.recipe import load_recipe
from tests.unit.test_report import _manifest


class FakeServer:
    def __init__(self, checkpoint, *, name, log_path, config, scheme=None):
        self.name, self.cuda, self.url = name, False, "http://127.0.0.1:9"  # nothing listens: no /metrics
        self.proc = type("P", (), {"pid": os.getpid()})()
        self.python = sys.executable

    def env(self):
        return dict(os.environ)

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

    def fake_level(server, checkpoint, cfg, c, out_dir, client=None):
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


@pytest.mark.parametrize(("engine", "status", "reason", "want"), [
    ("emulated (transformers)", "ok", "vLLM: unsupported here: no kernel; scored emulated", "unsupported"),
    ("vllm", "failed", "vLLM exited with code 1 during start-up: SafetensorError: bad header", "failed"),
    ("vllm", "failed", "config.json: quantization_config disagrees with the manifest", "failed"),
    ("vllm", "failed", "vLLM died while scoring qg_stdlib_ppl", None),  # may be transient: bench tries
    ("vllm", "ok", None, None),
])
def test_bench_does_not_restart_what_eval_could_not_serve(tmp_path: Path, monkeypatch, engine, status, reason, want):
    from qgcore.artifacts import EvalRun

    starts = []
    monkeypatch.setattr(bs, "VllmServer", lambda *a, **k: starts.append(1) or FakeServer(*a, **k))
    monkeypatch.setattr(bs, "run_level", lambda *a: {"concurrency": 1, "output_throughput": 5.0,
                                                      "request_throughput": 1.0, "p95_ttft_ms": 1.0,
                                                      "p95_itl_ms": 1.0, "failed": 0})
    monkeypatch.setattr(bs, "vllm_version", lambda: "test")
    m = _manifest("fp8", 1000)
    (tmp_path / "fp8").mkdir()
    EvalRun(variant="fp8", status=status, reason=reason, engine=engine, manifest_key=m.content_key,
            tasks={}).write(tmp_path / "fp8" / "eval.json")
    run = bs.bench_variant(m, tmp_path, BenchConfig(concurrency=[1]), force=True)
    if want is None:
        assert starts and run.status == "ok"
    else:
        assert not starts and run.status == want and run.reason.startswith("not benched:") and not run.levels
