"""`make bench-pipeline`: what `quantgate all` costs beyond its stages, and what a rerun with nothing changed costs.

Runs `quantgate all` twice in fresh processes on the same small configuration (default model, bf16 + fp8,
a few items, a short bench). Prints, from this one run: the wall time of the whole command vs the sum of
its stages (timings.json): the orchestration overhead, process start and imports included; and the
rerun's wall time vs the first: every stage must reuse its cached result (content keys unchanged), and
nothing it can skip may run (no task index built, no vLLM probe, no model hashed again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from qgcore.paths import slug_for


def _run(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, check=False).returncode
    return time.perf_counter() - t0, rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--runs", type=Path, default=Path("runs/bench-pipeline"))
    p.add_argument("--recipes", default="bf16,fp8")
    p.add_argument("--limit", type=int, default=20)
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "quantgate.cli", "all", "--runs", str(args.runs), "--recipes", args.recipes,
           "--tasks", "qg_stdlib_cont,qg_stdlib_ppl", "--limit", str(args.limit), "--max-load", "2", "--demo"]
    if args.model:
        cmd += ["--model", args.model]
    timings = args.runs / slug_for(args.model) / "timings.json"
    first, rc1 = _run(cmd)
    stages = json.loads(timings.read_text())["stages_seconds"]
    stage_sum = sum(v for k, v in stages.items() if k != "total")
    rerun, rc2 = _run(cmd)
    again = json.loads(timings.read_text())["stages_seconds"]
    out = {"first_seconds": round(first, 1), "sum_of_stages_seconds": round(stage_sum, 1),
           "overhead_ratio": round(first / stage_sum, 3), "rerun_seconds": round(rerun, 1),
           "rerun_ratio": round(rerun / first, 3), "rerun_stages_seconds": again, "exit_codes": [rc1, rc2]}
    (args.runs / "bench-pipeline.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    print(f"quantgate all: {first:.1f}s wall vs {stage_sum:.1f}s in its stages = {first / stage_sum:.3f}x; "
          f"rerun with nothing changed: {rerun:.1f}s = {rerun / first:.3f}x of the first run")
    return 0 if rc1 == rc2 == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
