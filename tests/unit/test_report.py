"""Report and gate from JSON artifacts alone (synthetic ones here; the e2e tests use real ones)."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from qgcore.artifacts import BenchRun, CheckpointManifest, DivergenceRun, EvalRun, ModelRef, TaskResult
from qgcore.integrity import record_files
from qgcore.stats import compare
from quantgate.cli import main
from quantize.recipe import load_recipe
from reports.data import build_report_data
from reports.policy import load_policy
from reports.render import render

MODEL = ModelRef(model_id="tiny", path="/m", revision="sha256:abc", slug="tiny", source="local")


def _manifest(name: str, size: int, files: dict | None = None) -> CheckpointManifest:
    r = load_recipe(name)
    return CheckpointManifest(files=files or {},
        content_key=f"k-{name}", model=MODEL, recipe=name, recipe_hash=r.content_hash(),
        recipe_spec=r.model_dump(mode="json"), calibration=None, calibration_data=None, versions={"torch": "x"},
        device={"device": "cpu"}, wall_seconds=1.0, peak_memory={"rss_bytes": 1 << 30}, bytes_on_disk=size,
        checkpoint_dir="checkpoint", quantization={}, serve=r.serve.model_dump(), created_at="2026-01-01T00:00:00Z")


def _items(correct: list[int]) -> dict[str, list[float]]:
    return {str(i): [float(v), 1.0] for i, v in enumerate(correct)}


def _write_variant(run: Path, name: str, correct: list[int], tps: float, size: int, base: dict | None) -> dict:
    vdir = run / name
    (vdir / "checkpoint").mkdir(parents=True)
    (vdir / "checkpoint" / "config.json").write_text('{"model_type": "llama"}')
    _manifest(name, size, record_files(vdir / "checkpoint")).write(vdir / "manifest.json")
    items = _items(correct)
    task = TaskResult(key="k", task="mc", status="ok", engine="vllm", metric="acc,none", higher_is_better=True,
                      binary=True, value=sum(correct) / len(correct), stderr=0.01, n_items=len(correct), items=items)
    comps = {}
    if base is not None:
        comps["mc"] = compare({k: tuple(v) for k, v in base.items()}, {k: tuple(v) for k, v in items.items()},
                              metric="acc,none", higher_is_better=True, binary=True).to_dict()
    EvalRun(variant=name, status="ok", engine="vllm", manifest_key=f"k-{name}", tasks={"mc": task},
            comparisons=comps).write(vdir / "eval.json")
    levels = []
    for c, scale in ((1, 0.2), (8, 1.0), (32, 1.6)):  # throughput grows with concurrency, and so does latency
        levels.append({"concurrency": c, "output_throughput": tps * scale, "request_throughput": tps * scale / 64,
                       "p50_ttft_ms": 50.0 * scale, "p95_ttft_ms": 90.0 * scale * c / 8, "p99_ttft_ms": 99.0 * scale,
                       "p50_itl_ms": 10.0, "p95_itl_ms": 20.0 * c / 8 + 5, "p99_itl_ms": 30.0 * c / 8 + 5,
                       "p50_e2el_ms": 700.0, "p95_e2el_ms": 900.0, "p99_e2el_ms": 990.0, "failed": 0,
                       "metrics": {"kv_cache_usage_perc": {"peak": 0.3}, "num_requests_waiting": {"peak": 2},
                                   "request_queue_time_seconds": {"mean": 0.01}}})
    point = {"concurrency": 8, "output_tokens_per_s": tps, "requests_per_s": tps / 64, "price_per_hour": 2.4,
             "usd_per_1m_output_tokens": 2.4 / (tps * 3600) * 1e6}
    BenchRun(variant=name, status="ok", key="k", tool={"name": "vllm bench serve", "version": "0"},
             settings={"input_len": 128, "output_len": 64, "seed": 0, "price_key": "H100"}, levels=levels,
             slo={"ttft_p95_s": 3.0, "itl_p95_ms": 50.0}, slo_point=point,
             memory={"server_rss_bytes_peak": size * 3, "kind": "host RSS", "weights_bytes": size,
                     "kv_cache_bytes": 2 * size, "kv_cache_tokens": 9000, "context_len": 2048,
                     "max_concurrent_sequences_at_context_len": 4.4}).write(vdir / "bench.json")
    if base is not None:
        kl = 0.01 if name == "fp8" else 0.3
        depth = [{"depth_from": a, "depth_to": b, "n_tokens": 100, "kl_mean": kl * f, "kl_median": kl, "kl_p90": kl,
                  "kl_p99": 3 * kl, "top1_agreement": 1 - kl * f, "p_ref_top_mean": 0.5}
                 for a, b, f in ((0, 512, 1.0), (512, 2048, 1.5))]
        DivergenceRun(variant=name, status="ok", engine="vllm", reference_engine="vllm", key="k", k=20,
                      method="top-k", source="synthetic", n_docs=2, max_model_len=2048,
                      overall={"n_tokens": 200, "kl_mean": kl, "kl_median": kl, "kl_p90": kl, "kl_p99": 3 * kl,
                               "top1_agreement": 1 - kl, "p_ref_top_mean": 0.5, "kl_mean_ci": [kl / 2, kl * 2]},
                      by_depth=depth, doc_kl_mean=[kl, kl]).write(vdir / "divergence.json")
    return items


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "tiny"
    base_correct = [1] * 300 + [0] * 200
    base = _write_variant(run, "bf16", base_correct, 100.0, 1000, None)
    _write_variant(run, "fp8", base_correct, 130.0, 600, base)  # identical answers, faster: promote
    gptq = [0] * 120 + [1] * 180 + [0] * 200  # 120 right->wrong: clearly worse
    _write_variant(run, "gptq-4", gptq, 200.0, 400, base)
    return run


@pytest.fixture
def report_run(run_dir: Path) -> Path:
    """Plus a variant whose server never came up: no bench, no divergence; the report renders around it."""
    run = run_dir
    awq = run / "awq-4"
    (awq / "checkpoint").mkdir(parents=True)
    (awq / "checkpoint" / "config.json").write_text('{"model_type": "llama"}')
    _manifest("awq-4", 400, record_files(awq / "checkpoint")).write(awq / "manifest.json")
    EvalRun(variant="awq-4", status="failed", reason="vLLM exited with code 1 during start-up", engine="vllm",
            manifest_key="k-awq-4", tasks={}).write(awq / "eval.json")
    return run


def test_gate_cli_writes_verdict_and_junit(run_dir: Path, capsys):
    assert main(["gate", str(run_dir)]) == 0
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["schema_version"] == 2
    assert verdict["multiplicity"] == {"correction": "bonferroni", "alpha": 0.05, "k": 2, "level": 0.975}
    assert verdict["variants"]["fp8"]["verdict"] == "promote"
    assert verdict["variants"]["gptq-4"]["verdict"] == "reject"
    assert verdict["recommended"] == "fp8"
    assert verdict["deploy"]["command"].startswith("vllm serve ") and "--served-model-name fp8" in \
        verdict["deploy"]["command"]
    suite = ET.parse(run_dir / "verdict.junit.xml").getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert cases[("quantgate.gptq-4", "quality:mc")].find("failure") is not None
    assert cases[("quantgate.fp8", "quality:mc")].find("failure") is None
    assert int(suite.get("failures")) >= 1
    assert "recommended: fp8" in capsys.readouterr().out


def test_gate_exit_codes(run_dir: Path, tmp_path: Path):
    assert main(["gate", str(run_dir), "--require", "gptq-4"]) == 2
    assert main(["gate", str(run_dir), "--require", "nope"]) == 3
    assert main(["gate", str(tmp_path / "missing")]) == 1
    (run_dir / "fp8" / "eval.json").write_text("{not json")
    assert main(["gate", str(run_dir)]) == 1
    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text("quality:\n  margins: {8bit: 0.02}\n  margin_typo: 1\n")
    assert main(["gate", str(run_dir), "--policy", str(bad_policy)]) == 3


def test_gate_rejects_everything_when_all_worse(run_dir: Path):
    shutil.rmtree(run_dir / "fp8")
    assert main(["gate", str(run_dir)]) == 2
    assert json.loads((run_dir / "verdict.json").read_text())["recommended"] is None


def test_report_is_self_contained(report_run: Path):
    html = render(build_report_data(report_run, load_policy()))
    assert "Gate: PASSED" in html and "fp8" in html
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "no external URL may appear"
    assert "<script src" not in html and "<link" not in html
    assert "right→wrong" in html  # flip counts shown
    assert html.count("<svg") >= 9  # forest, 2 latency curves, quality-vs-throughput, 3 memory, 2 by depth
    assert 'href="#task-mc"' in html and 'id="task-mc"' in html and 'href="#bench-fp8"' in html  # deep links
    assert 'id="divergence-table"' in html and "fp8" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # the screenshot is part of the test output
CHARTS = {  # data-chart label -> what must be drawn in it
    "forest plot mc": "class=\"ci\"", "ITL p95 ms vs output": "class=\"series\"",
    "TTFT p95 ms vs output": "class=\"series\"", "stacked bars weights + KV cache": "class=\"bar\"",
    "mean KL from bf16, nats vs context": "class=\"series\"",
    "top-1 agreement with bf16 vs context": "class=\"series\"",
}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make setup installs it)")
def test_report_renders_in_headless_chromium(report_run: Path, tmp_path: Path):
    """Chromium opens the file offline; every chart drew data and axis labels; no console errors; screenshot kept."""
    assert main(["report", str(report_run)]) == 0
    page = (report_run / "report.html").resolve()
    SHOTS.mkdir(exist_ok=True)
    shot = SHOTS / "report.png"
    shot.unlink(missing_ok=True)
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    out = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,6000", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 30_000
    print(f"report screenshot: {shot}")
    assert not re.search(r"CONSOLE|Uncaught|Failed to load resource", out.stderr), out.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    assert "Gate: PASSED" in dom and "Recommended variant" in dom
    assert re.search(r"promote</span>", dom) and re.search(r"reject</span>", dom)
    svgs = dict(re.findall(r'<svg class="chart"[^>]*data-chart="([^"]+)"[^>]*>(.*?)</svg>', dom, re.S))
    for label, mark in CHARTS.items():
        chart = next((body for name, body in svgs.items() if name.startswith(label)), None)
        assert chart is not None, (label, list(svgs))
        assert mark in chart, label
        drawn = re.search(r' d="M[\d.]+,[\d.]+[HL]', chart) or re.search(r'class="bar"[^>]*width="[1-9]', chart)
        assert drawn, f"{label}: nothing drawn"
        assert re.search(r'class="axis"[^>]*>[^<]+<', chart), f"{label}: no axis label"
    assert "vLLM exited with code 1 during start-up" in dom  # the failed variant is shown, not dropped


def test_ci_entry_point_keeps_exit_codes_on_promoted_and_rejected_runs(run_dir: Path):
    """The installed console script (what CI calls): 0 when a variant is promoted, 2 when the required one is not."""
    exe = Path(__file__).resolve().parents[2] / ".venvs/quantize/bin/quantgate"
    promoted = subprocess.run([str(exe), "gate", str(run_dir)], capture_output=True, text=True, check=False)
    assert promoted.returncode == 0 and "recommended: fp8" in promoted.stdout
    rejected = subprocess.run([str(exe), "gate", str(run_dir), "--require", "gptq-4"], capture_output=True,
                              text=True, check=False)
    assert rejected.returncode == 2 and "gptq-4: REJECT" in rejected.stdout


def test_report_shows_where_the_time_went(run_dir: Path):
    (run_dir / "timings.json").write_text(json.dumps({"stages_seconds": {"quantize": 12.5, "eval": 300.0,
                                                                          "total": 312.5}, "exit_codes": {}}))
    data = build_report_data(run_dir, load_policy())
    assert data["timings"]["stages_seconds"]["eval"] == 300.0
    assert [r["variant"] for r in data["timings"]["variants"]] == ["bf16", "fp8", "gptq-4"]
    html = render(data)
    assert 'id="stage-timings"' in html and "300.0 s" in html


def test_target_gpu_fallback_note_is_shown(run_dir: Path):
    m = CheckpointManifest.read(run_dir / "gptq-4" / "manifest.json")
    note = "weight-only NVFP4 (W4A16 Marlin) below 10.0; no FP4 activation speed-up"
    m.model_copy(update={"device": {"device": "cpu", "fallback": note}}).write(run_dir / "gptq-4" / "manifest.json")
    html = render(build_report_data(run_dir, load_policy()))
    assert f"target GPU: {note}" in html
