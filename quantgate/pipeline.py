"""`quantgate all`: quantize -> eval -> bench -> gate -> report -> deploy kit, with CI's exit codes kept.

GNU make exits 2 for any failing recipe, so `make all` cannot tell "the gate said no" (2) from "a tool
broke" (1, 3-8). This is the entry point CI calls instead: a stage that loses only some variants (9)
does not stop the rest; any other failure stops the run with its own code; otherwise the exit code is the
gate's (0 promoted / 2 rejected), or 9 when the gate promoted but some variant failed somewhere.
Quantize runs in a process of its own, so llmcompressor's memory is gone before any server starts.
Each run writes `<run>/timings.json`: wall seconds per stage, as measured here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qgcore.artifacts import Timings
from qgcore.errors import EXIT_GATE_REJECTED, EXIT_OK, EXIT_PARTIAL, QuantgateError
from qgcore.run import RunContext

if TYPE_CHECKING:
    from evals.bench_stage import BenchRequest
    from evals.stage import EvalRequest, Stopping

Stage = Callable[[], int]


def combine(stage_codes: dict[str, int], gate_code: int | None) -> int:
    """The run's exit code from each stage's: first hard failure wins; then the gate; 9 if a stage was partial."""
    for code in stage_codes.values():
        if code not in (EXIT_OK, EXIT_PARTIAL):
            return code
    if gate_code is None:
        return EXIT_OK
    if gate_code != EXIT_OK:
        return gate_code
    return EXIT_PARTIAL if EXIT_PARTIAL in stage_codes.values() else EXIT_OK


def run_stages(stages: dict[str, Stage], gate: Stage, timings_path: Path, after: dict[str, Stage] | None = None) -> int:
    """Run `stages` in order, then `gate` unless a stage failed hard, then `after` (report, deploy kit: also when
    the gate said no); record wall times after every step; return the exit code."""
    codes: dict[str, int] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str, fn: Stage) -> int:
        t0 = time.perf_counter()
        try:
            codes[name] = fn()
        except QuantgateError as err:
            print(f"quantgate: error in {name}: {err}", file=sys.stderr)
            codes[name] = err.exit_code
        timings[name] = round(time.perf_counter() - t0, 2)
        timings["total"] = round(time.perf_counter() - started, 2)
        if timings_path.parent.is_dir():  # written as we go: the report (last) reads every stage before it
            Timings(stages_seconds=timings, exit_codes=codes).write(timings_path)
        return codes[name]

    for name, stage in stages.items():
        if step(name, stage) not in (EXIT_OK, EXIT_PARTIAL):
            return combine(codes, None)
    gate_code = step("gate", gate)
    code = combine({k: v for k, v in codes.items() if k != "gate"}, gate_code)
    if gate_code in (EXIT_OK, EXIT_GATE_REJECTED):
        for name, fn in (after or {}).items():
            if (c := step(name, fn)) != EXIT_OK:
                return c
    return code


def quantize_in_own_process(ctx: RunContext, *, recipes: list[str] | None, target_gpu: str | None,
                            demo: bool) -> int:
    """`quantgate quantize` as a child process: its exit code, and llmcompressor's memory freed with it."""
    cmd = [sys.executable, "-m", "quantgate.cli", "quantize", "--runs", str(ctx.run_dir.parent)]
    if ctx.model:
        cmd += ["--model", ctx.model]
    if recipes:
        cmd += ["--recipes", ",".join(recipes)]
    if target_gpu:
        cmd += ["--target-gpu", target_gpu]
    if demo:
        cmd.append("--demo")
    return subprocess.run(cmd, check=False).returncode


@dataclass
class AllRequest:
    recipes: list[str] | None
    eval: EvalRequest  # its stopping rule is built once quantize has declared the run's recipes
    bench: BenchRequest
    policy: Path | None
    require: str | None
    target_gpu: str | None
    demo: bool
    deploy_all: bool = False


def run_all(ctx: RunContext, req: AllRequest, *, stopping: Callable[[], Stopping | None]) -> int:
    """`stopping()`: the eval stage's stopping rule, built once quantize has declared the run's recipes."""
    from evals.bench_stage import run_bench_stage
    from evals.stage import run_eval_stage
    from quantgate.context import record_run
    from reports.stage import run_deploy, run_gate, run_report

    def evaluate() -> int:
        record_run(ctx)  # the serving plan of every variant quantize left, under this context
        return run_eval_stage(ctx, replace(req.eval, stopping=stopping()))

    stages: dict[str, Stage] = {
        "quantize": lambda: quantize_in_own_process(ctx, recipes=req.recipes, target_gpu=req.target_gpu,
                                                    demo=req.demo),
        "eval": evaluate,
        "bench": lambda: run_bench_stage(ctx, req.bench),
    }
    run_dir = ctx.run_dir
    code = run_stages(stages, lambda: run_gate(run_dir, policy_path=req.policy, require=req.require, junit=None),
                      run_dir / "timings.json",
                      after={"report": lambda: run_report(run_dir),
                             "deploy": lambda: run_deploy(run_dir, every=req.deploy_all)})
    print(f"report: {run_dir / 'report.html'}  verdict: {run_dir / 'verdict.json'}  exit: {code}")
    return code


def demo_exit(code: int) -> int:
    """`make demo` is read, not enforced: the gate saying no is a result there, a broken tool is not."""
    return EXIT_OK if code == EXIT_GATE_REJECTED else code
