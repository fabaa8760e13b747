"""`quantgate all`: quantize -> eval -> bench -> gate -> report in one process, with CI's exit codes kept.

GNU make exits 2 for any failing recipe, so `make all` cannot tell "the gate said no" (2) from "a tool
broke" (1, 3-8). This is the entry point CI calls instead: a stage that loses only some variants (9)
does not stop the rest; any other failure stops the run with its own code; otherwise the exit code is the
gate's (0 promoted / 2 rejected), or 9 when the gate promoted but some variant failed somewhere.
Each run writes `<run>/timings.json`: wall seconds per stage, as measured here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from qgcore.errors import EXIT_GATE_REJECTED, EXIT_OK, EXIT_PARTIAL, QuantgateError
from qgcore.paths import slug_for

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


def run_stages(stages: dict[str, Stage], gate: Stage, timings_path: Path, report: Stage | None = None) -> int:
    """Run `stages` in order, then `gate` unless a stage failed hard, then `report` (also when the gate said no);
    record wall times after every step; return the exit code."""
    codes: dict[str, int] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str, fn: Stage) -> int:
        t0 = time.perf_counter()
        try:
            codes[name] = fn()
        except QuantgateError as err:
            print(f"quantgate: error in {name}: {err}")
            codes[name] = err.exit_code
        timings[name] = round(time.perf_counter() - t0, 2)
        timings["total"] = round(time.perf_counter() - started, 2)
        if timings_path.parent.is_dir():  # written as we go: the report (last) reads every stage before it
            timings_path.write_text(json.dumps({"stages_seconds": timings, "exit_codes": codes}, indent=1) + "\n")
        return codes[name]

    for name, stage in stages.items():
        if step(name, stage) not in (EXIT_OK, EXIT_PARTIAL):
            return combine(codes, None)
    gate_code = step("gate", gate)
    code = combine({k: v for k, v in codes.items() if k != "gate"}, gate_code)
    if report is not None and gate_code in (EXIT_OK, EXIT_GATE_REJECTED):
        report_code = step("report", report)
        if report_code != EXIT_OK:
            return report_code
    return code


def run_all(*, model: str | None, recipes: list[str] | None, runs_root: Path, tasks: list[str] | None,
            limit: int | None, include_path: Path | None, emulate: bool, target_gpu: str | None,
            concurrency: str | None, bench_config: Path | None, policy: Path | None, require: str | None,
            verify: bool, demo: bool = False, divergence_docs: int | None = None,
            divergence_data: str | None = None) -> int:
    from evals.bench_stage import DEMO_CPU_CONFIG, run_bench_stage
    from evals.serve import on_cuda
    from evals.stage import run_eval_stage
    from quantize.stage import run_stage
    from reports.stage import run_gate, run_report

    run_dir = runs_root / slug_for(model)
    if demo and divergence_docs is None:
        divergence_docs = DEMO_DIVERGENCE_DOCS
    if demo:
        limit, tasks, bench_config = demo_settings(run_dir, limit=limit, tasks=tasks, bench_config=bench_config,
                                                   cuda=on_cuda(), demo_cpu_bench=DEMO_CPU_CONFIG,
                                                   divergence_docs=divergence_docs or 0)
    else:
        (run_dir / "demo.json").unlink(missing_ok=True)
    stages: dict[str, Stage] = {
        "quantize": lambda: run_stage(model=model, recipes=recipes, runs_root=runs_root, target_gpu=target_gpu,
                                      sizing=DEMO_SIZING if demo else None),
        "eval": lambda: run_eval_stage(model=model, recipes=recipes, runs_root=runs_root, tasks=tasks,
                                       include_path=include_path, limit=limit, emulate=emulate, force=False,
                                       verify=verify, divergence_data=divergence_data,
                                       divergence_docs=divergence_docs),
        "bench": lambda: run_bench_stage(model=model, recipes=recipes, runs_root=runs_root, config_path=bench_config,
                                         concurrency=concurrency, force=False),
    }
    code = run_stages(stages, lambda: run_gate(run_dir, policy_path=policy, require=require, junit=None),
                      run_dir / "timings.json", report=lambda: run_report(run_dir, policy_path=policy))
    print(f"report: {run_dir / 'report.html'}  verdict: {run_dir / 'verdict.json'}  exit: {code}")
    return code


# What `make demo` changes to fit a first run on 2 CPU cores; written to runs/<slug>/demo.json and shown in the
# report, so a smaller demo never passes for a full run.
DEMO_LIMIT = 100  # the gate's min_items: the smallest n at which a task can decide
DEMO_TASKS = ["qg_stdlib_cont", "qg_stdlib_ppl", "mmlu_pro"]  # the tasks the default model can decide on
DEMO_DIVERGENCE_DOCS = 3  # documents filling the context (the stage default is 24): 3 gives a CI over documents
# calibrated recipes: samples x tokens (the recipes say 64 x 512) and AWQ's scale-search grid (llmcompressor: 20)
DEMO_SIZING = {"num_samples": 32, "seq_len": 256, "grid_points": 10}
DEMO_WHY = ("demo sizing for a first run on a small machine: {limit} items per task (the gate's minimum); tasks "
            "{tasks} (qg_mmlu_dev left out: SmolLM2-135M is at chance on it, so it decides nothing); calibration "
            "{num_samples} samples x {seq_len} tokens (the recipes say 64 x 512) and AWQ's scale search on "
            "{grid_points} grid points (20 by default), so the AWQ/GPTQ/NVFP4/FP8-KV checkpoints differ from a full "
            "run's; divergence from bf16 on {docs} documents (24 by default); bench {bench}. `make all` runs the "
            "recipes as written, every item, the full bench.")


def demo_settings(run_dir: Path, *, limit: int | None, tasks: list[str] | None, bench_config: Path | None,
                  cuda: bool, demo_cpu_bench: Path,
                  divergence_docs: int = DEMO_DIVERGENCE_DOCS) -> tuple[int, list[str], Path | None]:
    """Fill what the user left open with the demo's sizing and record it in `run_dir/demo.json`."""
    limit = limit if limit is not None else DEMO_LIMIT
    tasks = tasks or list(DEMO_TASKS)
    if bench_config is None and not cuda:
        bench_config = demo_cpu_bench
    run_dir.mkdir(parents=True, exist_ok=True)
    bench = bench_config.name if bench_config else "GPU defaults"
    (run_dir / "demo.json").write_text(json.dumps({
        "limit": limit, "tasks": tasks, "bench_config": bench, "quantize_sizing": DEMO_SIZING,
        "divergence_docs": divergence_docs,
        "note": DEMO_WHY.format(limit=limit, tasks=", ".join(tasks), bench=bench, docs=divergence_docs,
                                **DEMO_SIZING)},
        indent=1) + "\n")
    return limit, tasks, bench_config


def demo_exit(code: int) -> int:
    """`make demo` is read, not enforced: the gate saying no is a result there, a broken tool is not."""
    return EXIT_OK if code == EXIT_GATE_REJECTED else code
