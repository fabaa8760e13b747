"""`quantgate all`: the exit code CI reads, stage by stage, and the timings it records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qgcore.errors import ConfigError
from qgcore.paths import slug_for
from quantgate import pipeline
from quantgate.context import resolve
from quantgate.pipeline import AllRequest, combine, demo_exit, quantize_in_own_process, run_stages

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


def _stage(ran: list[str], name: str, code: int):  # noqa: ANN202
    def run() -> int:
        ran.append(name)
        if code == 3:
            raise ConfigError("bad recipe")
        return code
    return run


def test_a_failing_stage_stops_the_run_and_timings_are_written(tmp_path: Path, capsys):
    ran: list[str] = []
    timings = tmp_path / "timings.json"
    code = run_stages({"quantize": _stage(ran, "quantize", 0), "eval": _stage(ran, "eval", 3),
                       "bench": _stage(ran, "bench", 0)}, _stage(ran, "gate", 0), timings,
                      after={"report": _stage(ran, "report", 0)})
    assert code == 3 and ran == ["quantize", "eval"]  # no gate, no report on a broken run
    assert "quantgate: error in eval: bad recipe" in capsys.readouterr().err
    data = json.loads(timings.read_text())
    assert set(data["stages_seconds"]) == {"quantize", "eval", "total"} and data["exit_codes"]["eval"] == 3
    ran.clear()
    code = run_stages({"quantize": _stage(ran, "q", 0), "eval": _stage(ran, "e", 9)}, _stage(ran, "gate", 2), timings,
                      after={"report": _stage(ran, "report", 0), "deploy": _stage(ran, "deploy", 0)})
    assert code == 2 and ran == ["q", "e", "gate", "report", "deploy"]  # report and kit also when the gate says no
    data = json.loads(timings.read_text())
    assert data["exit_codes"] == {"quantize": 0, "eval": 9, "gate": 2, "report": 0, "deploy": 0}
    assert data["stages_seconds"]["total"] >= sum(v for k, v in data["stages_seconds"].items() if k != "total")


@pytest.mark.parametrize(("gate", "after", "want", "ran"), [
    (0, {"report": 0, "deploy": 0}, 9, ["gate", "report", "deploy"]),  # partial eval, gate passed: 9
    (1, {"report": 0, "deploy": 0}, 1, ["gate"]),  # the gate broke: nothing to render or deploy
    (0, {"report": 3, "deploy": 0}, 3, ["gate", "report"]),  # a failing report stops, with its own code
    (2, {"report": 0, "deploy": 1}, 1, ["gate", "report", "deploy"]),  # a kit that fails validation is a tool error
])
def test_after_steps_run_only_on_a_verdict_and_their_failure_is_the_runs(tmp_path: Path, gate, after, want, ran):
    seen: list[str] = []
    code = run_stages({"eval": lambda: 9}, _stage(seen, "gate", gate), tmp_path / "timings.json",
                      after={name: _stage(seen, name, c) for name, c in after.items()})
    assert code == want and seen == ran


def test_no_timings_file_without_a_run_folder(tmp_path: Path):
    timings = tmp_path / "not-yet" / "timings.json"  # quantize creates the run folder; before it nothing is written
    assert run_stages({"quantize": lambda: 3}, lambda: 0, timings) == 3
    assert not timings.parent.exists()


def test_demo_reads_the_gate_but_not_a_broken_tool():
    assert (demo_exit(2), demo_exit(0), demo_exit(1), demo_exit(9)) == (0, 0, 1, 9)


def test_make_hides_the_code_the_cli_keeps(tmp_path: Path):
    """Why CI calls the CLI: on a broken run (no artifacts) make says 2, like a rejection; the CLI says 1."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cli = subprocess.run([str(ROOT / ".venvs/quantize/bin/quantgate"), "gate", str(empty)], capture_output=True,
                         text=True, check=False)
    assert cli.returncode == 1
    assert cli.stderr.strip() == f"quantgate: error: missing {empty / 'run.json'}: run `make quantize` first"
    make = subprocess.run(["make", "-s", "gate", f"RUN={empty}"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert make.returncode == 2


def test_quantize_runs_in_its_own_process_with_the_runs_arguments(tmp_path: Path, monkeypatch):
    """The child gets the same run folder, model, recipes, target and demo flag, and its exit code is the stage's."""
    from quantgate.cli import build_parser
    from tests.unit.test_context import ctx_for

    ctx = ctx_for(tmp_path / "runs")  # model org/tiny
    seen = {}
    monkeypatch.setattr(pipeline.subprocess, "run", lambda cmd, check: seen.setdefault("cmd", cmd) and
                        subprocess.CompletedProcess(cmd, 9))
    assert quantize_in_own_process(ctx, recipes=["bf16", "fp8"], target_gpu="L4", demo=True) == 9
    cmd = seen["cmd"]
    assert cmd[:3] == [sys.executable, "-m", "quantgate.cli"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.command, args.model, args.recipes, args.target_gpu, args.demo) == \
        ("quantize", "org/tiny", "bf16,fp8", "L4", True)
    assert args.runs / slug_for(args.model) == ctx.run_dir  # the child writes where the parent reads
    seen.clear()
    quantize_in_own_process(resolve(runs_root=tmp_path, model=None, platform=ctx.platform), recipes=None,
                            target_gpu=None, demo=False)
    args = build_parser().parse_args(seen["cmd"][3:])
    assert (args.model, args.recipes, args.target_gpu, args.demo) == (None, None, None, False)


def test_quantize_child_process_exit_code_is_real(tmp_path: Path):
    """No mock: the child `quantgate quantize` refuses an unknown recipe with its own config code."""
    from tests.unit.test_context import ctx_for

    assert quantize_in_own_process(ctx_for(tmp_path), recipes=["gptq4"], target_gpu=None, demo=False) == 3


def test_run_all_runs_the_stages_in_order_and_keeps_the_gates_code(tmp_path: Path, monkeypatch, capsys):
    import evals.bench_stage
    import evals.stage
    import quantgate.context
    import reports.stage
    from evals.bench_stage import BenchRequest
    from evals.stage import EvalRequest
    from tests.unit.test_context import ctx_for

    ctx = ctx_for(tmp_path)
    calls: list[tuple] = []
    codes = {"quantize": 0, "eval": 9, "bench": 0, "gate": 2}

    def quantize(c, *, recipes, target_gpu, demo):  # noqa: ANN001, ANN202
        calls.append(("quantize", recipes, target_gpu, demo))
        return codes["quantize"]

    monkeypatch.setattr(pipeline, "quantize_in_own_process", quantize)
    monkeypatch.setattr(quantgate.context, "record_run", lambda c: calls.append(("record_run",)))
    monkeypatch.setattr(evals.stage, "run_eval_stage", lambda c, r: calls.append(("eval", r.stopping)) or codes["eval"])
    monkeypatch.setattr(evals.bench_stage, "run_bench_stage",
                        lambda c, r: calls.append(("bench", r.max_load)) or codes["bench"])
    monkeypatch.setattr(reports.stage, "run_gate", lambda d, **kw: calls.append(("gate", d, kw["require"])) or
                        codes["gate"])
    monkeypatch.setattr(reports.stage, "run_report", lambda d: calls.append(("report", d)) or 0)
    monkeypatch.setattr(reports.stage, "run_deploy", lambda d, every: calls.append(("deploy", d, every)) or 0)
    stopped: list[int] = []

    def stopping() -> str:
        stopped.append(len(calls))  # when the rule is built: after quantize has declared the recipes
        return "the stopping rule"

    req = AllRequest(recipes=["bf16", "fp8"], eval=EvalRequest(), bench=BenchRequest(max_load=16), policy=None,
                     require="fp8", target_gpu="L4", demo=False, deploy_all=True)
    assert pipeline.run_all(ctx, req, stopping=stopping) == 2  # the gate's no wins over a partial eval
    run = ctx.run_dir
    assert calls == [("quantize", ["bf16", "fp8"], "L4", False), ("record_run",), ("eval", "the stopping rule"),
                     ("bench", 16), ("gate", run, "fp8"), ("report", run), ("deploy", run, True)]
    assert stopped == [2]
    assert "exit: 2" in capsys.readouterr().out
    calls.clear()
    codes["quantize"] = 3
    assert pipeline.run_all(ctx, req, stopping=stopping) == 3
    assert [c[0] for c in calls] == ["quantize"]


def test_demo_sizing_fills_only_what_is_open_and_is_recorded(tmp_path: Path):
    from evals.bench_stage import DEMO_CPU_CONFIG
    from evals.tasks import demo_tasks
    from quantgate.demo import DEMO_DIVERGENCE_DOCS, DEMO_LIMIT, DEMO_SIZING, demo_settings

    suite = demo_tasks()
    demo = demo_settings(tasks=None, limit=None, divergence_docs=None, bench_config=None, cpu=True)
    assert demo.tasks == list(suite) and demo.limit == DEMO_LIMIT == 100
    assert demo.task_limits == {t: n for t, n in suite.items() if n is not None}  # the built-in tasks' own sizes
    assert demo.divergence_docs == DEMO_DIVERGENCE_DOCS and demo.bench_config == DEMO_CPU_CONFIG
    rec = demo.record()
    assert rec["quantize_sizing"] == DEMO_SIZING == {"num_samples": 32, "seq_len": 256, "grid_points": 10}
    assert rec["bench_config"] == DEMO_CPU_CONFIG.name and rec["limit"] == 100
    assert "32 samples x 256 tokens" in rec["note"] and "10 grid points" in rec["note"]
    for task in suite:  # every task with the item count it will really be scored at
        assert f"{task} ({suite[task] or DEMO_LIMIT} items)" in rec["note"]
    json.dumps(rec)  # recorded in eval.json's provenance: plain JSON
    # what the user set wins; on a GPU the bench keeps its GPU defaults
    mine = tmp_path / "b.yaml"
    demo = demo_settings(tasks=["qg_stdlib_cont"], limit=273, divergence_docs=0, bench_config=None, cpu=False)
    assert (demo.tasks, demo.limit, demo.task_limits, demo.divergence_docs, demo.bench_config) == \
        (["qg_stdlib_cont"], 273, {}, 0, None)
    assert "qg_stdlib_cont (273 items)" in demo.record()["note"] and demo.record()["bench_config"] == "GPU defaults"
    assert demo_settings(tasks=None, limit=None, divergence_docs=None, bench_config=mine, cpu=True).bench_config == mine
