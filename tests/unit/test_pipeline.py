"""`quantgate all`: the exit code CI reads, stage by stage, and the timings it records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qgcore.errors import ConfigError
from quantgate.pipeline import combine, demo_exit, run_stages

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("stages", "gate", "want"), [
    ({"quantize": 0, "eval": 0, "bench": 0}, 0, 0),
    ({"quantize": 0, "eval": 0, "bench": 0}, 2, 2),
    ({"quantize": 0, "eval": 9, "bench": 0}, 0, 9),  # gate passed, a variant failed somewhere
    ({"quantize": 0, "eval": 9, "bench": 0}, 2, 2),  # the gate's no wins over "partial"
    ({"quantize": 3}, None, 3),  # a bad recipe stops everything with its own code
    ({"quantize": 0, "eval": 1}, None, 1),
])
def test_combine(stages, gate, want):
    assert combine(stages, gate) == want


def test_a_failing_stage_stops_the_run_and_timings_are_written(tmp_path: Path):
    ran = []

    def stage(name, code):
        def run():
            ran.append(name)
            if code == 3:
                raise ConfigError("bad recipe")
            return code
        return run

    timings = tmp_path / "timings.json"
    code = run_stages({"quantize": stage("quantize", 0), "eval": stage("eval", 3), "bench": stage("bench", 0)},
                      stage("gate", 0), timings)
    assert code == 3 and ran == ["quantize", "eval"]
    data = json.loads(timings.read_text())
    assert set(data["stages_seconds"]) == {"quantize", "eval", "total"} and data["exit_codes"]["eval"] == 3
    ran.clear()
    code = run_stages({"quantize": stage("q", 0), "eval": stage("e", 9)}, stage("gate", 2), timings,
                      report=stage("report", 0))
    assert code == 2 and ran == ["q", "e", "gate", "report"]  # the report is written when the gate says no
    data = json.loads(timings.read_text())
    assert data["exit_codes"] == {"quantize": 0, "eval": 9, "gate": 2, "report": 0}
    assert data["stages_seconds"]["total"] >= sum(v for k, v in data["stages_seconds"].items() if k != "total")


def test_demo_reads_the_gate_but_not_a_broken_tool():
    assert (demo_exit(2), demo_exit(0), demo_exit(1), demo_exit(9)) == (0, 0, 1, 9)


def test_make_hides_the_code_the_cli_keeps(tmp_path: Path):
    """Why CI calls the CLI: on a broken run (no artifacts) make says 2, like a rejection; the CLI says 1."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cli = subprocess.run([str(ROOT / ".venvs/quantize/bin/quantgate"), "gate", str(empty)], capture_output=True,
                         text=True, check=False)
    assert cli.returncode == 1 and "no bf16/manifest.json" in cli.stderr
    make = subprocess.run(["make", "-s", "gate", f"RUN={empty}"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert make.returncode == 2


def test_demo_sizing_fills_only_what_is_open_and_is_recorded(tmp_path: Path):
    from quantgate.pipeline import DEMO_LIMIT, DEMO_TASKS, demo_settings

    cpu_bench = tmp_path / "bench.demo-cpu.yaml"
    limit, tasks, bench = demo_settings(tmp_path / "run", limit=None, tasks=None, bench_config=None, cuda=False,
                                        demo_cpu_bench=cpu_bench)
    assert (limit, tasks, bench) == (DEMO_LIMIT, DEMO_TASKS, cpu_bench)
    rec = json.loads((tmp_path / "run" / "demo.json").read_text())
    assert rec["limit"] == 100 and "qg_mmlu_dev left out" in rec["note"] and rec["bench_config"] == cpu_bench.name
    assert rec["quantize_sizing"] == {"num_samples": 32, "seq_len": 256, "grid_points": 10}
    assert "32 samples x 256 tokens" in rec["note"] and "10 grid points" in rec["note"]
    # what the user set wins; on a GPU the bench keeps its GPU defaults
    limit, tasks, bench = demo_settings(tmp_path / "run", limit=273, tasks=["qg_mmlu_dev"], bench_config=None,
                                        cuda=True, demo_cpu_bench=cpu_bench)
    assert (limit, tasks, bench) == (273, ["qg_mmlu_dev"], None)
