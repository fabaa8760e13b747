"""Report and gate from JSON artifacts alone (synthetic ones here; the e2e tests use real ones)."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun, ModelRef, TaskResult
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
    level = {"concurrency": 8, "output_throughput": tps, "request_throughput": tps / 64, "p50_ttft_ms": 50.0,
             "p95_ttft_ms": 90.0, "p99_ttft_ms": 99.0, "p50_itl_ms": 10.0, "p95_itl_ms": 20.0, "p99_itl_ms": 30.0,
             "p50_e2el_ms": 700.0, "p95_e2el_ms": 900.0, "p99_e2el_ms": 990.0, "failed": 0,
             "metrics": {"kv_cache_usage_perc": {"peak": 0.3}, "num_requests_waiting": {"peak": 2},
                         "request_queue_time_seconds": {"mean": 0.01}}}
    point = {"concurrency": 8, "output_tokens_per_s": tps, "requests_per_s": tps / 64, "price_per_hour": 2.4,
             "usd_per_1m_output_tokens": 2.4 / (tps * 3600) * 1e6}
    BenchRun(variant=name, status="ok", key="k", tool={"name": "vllm bench serve", "version": "0"},
             settings={"input_len": 128, "output_len": 64, "seed": 0, "price_key": "H100"}, levels=[level],
             slo={"ttft_p95_s": 3.0, "itl_p95_ms": 50.0}, slo_point=point,
             memory={"server_rss_bytes_peak": size * 3, "kind": "host RSS"}).write(vdir / "bench.json")
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


def test_report_is_self_contained(run_dir: Path):
    html = render(build_report_data(run_dir, load_policy()))
    assert "Gate: PASSED" in html and "fp8" in html
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "no external URL may appear"
    assert "<script src" not in html and "<link" not in html
    assert "right→wrong" in html  # flip counts shown
    assert html.count("<svg") >= 3  # quality-vs-throughput, memory, disk


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make setup installs it)")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path):
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").resolve()
    shot = tmp_path / "report.png"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 10_000
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    assert "Gate: PASSED" in dom and "Recommended variant" in dom
    assert re.search(r"promote</span>", dom) and re.search(r"reject</span>", dom)


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
