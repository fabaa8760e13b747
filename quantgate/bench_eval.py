"""`make bench-eval`: the same items through lm-eval via the vLLM server and via lm-eval's `hf` backend.

Prints wall times and the speed ratio measured in this one run (a benchmark target, not a timed test),
plus how far the two engines' scores are apart on identical items.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from evals.quality import Endpoint, TaskIndex, run_task
from evals.serve import VllmServer
from evals.tasks import build_builtin_suite
from qgcore.paths import CACHE_DIR
from qgcore.serving import ServeConfig, server_environment
from quantgate.context import resolve
from quantize.model import resolve_model

TASKS = ("qg_mmlu_dev", "qg_stdlib_ppl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-eval", description=__doc__)
    p.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2)")
    p.add_argument("--limit", type=int, default=100, help="items per task (default 100)")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    args = p.parse_args(argv)
    import os

    model = resolve_model(args.model)
    ctx = resolve(runs_root=args.runs, model=args.model)
    out_dir = ctx.run_dir / "bench-eval"
    index = TaskIndex([build_builtin_suite(CACHE_DIR).include_dir])
    results: dict[str, dict] = {"vllm": {}, "hf": {}}
    # served as the eval stage serves (a scoring server: every CPU core computes), at a 2048-token context
    cfg = ServeConfig(platform=ctx.platform.kind, max_model_len=2048, cpu_reserved_cores=0)
    env = server_environment(cfg, dict(os.environ), cache_root=CACHE_DIR)
    t0 = time.perf_counter()
    with VllmServer(Path(model.path), name="reference", log_path=out_dir / "server.log", config=cfg, env=env,
                    python=ctx.serve_python) as srv:
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        ep = Endpoint(srv.base_url, "reference", model.path, cfg.max_model_len, ctx.platform.kind)
        for task in TASKS:
            results["vllm"][task] = run_task(task=task, tm=index.tm, endpoint=ep, generative=False, limit=args.limit,
                                             items=None, seed=0, samples_path=out_dir / "vllm" / f"{task}.jsonl")
        vllm_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    hf = Endpoint(None, "reference", model.path, cfg.max_model_len, ctx.platform.kind)
    for task in TASKS:
        results["hf"][task] = run_task(task=task, tm=index.tm, endpoint=hf, generative=False, limit=args.limit,
                                       items=None, seed=0, samples_path=out_dir / "hf" / f"{task}.jsonl")
    hf_s = time.perf_counter() - t2
    summary = {
        "model": model.model_id, "limit": args.limit, "tasks": list(TASKS),
        "vllm_seconds": round(vllm_s, 1), "vllm_startup_seconds": round(startup, 1), "hf_seconds": round(hf_s, 1),
        "speedup_vllm_over_hf": round(hf_s / vllm_s, 2),
        "speedup_including_startup": round(hf_s / (vllm_s + startup), 2),
        "scores": {e: {t: r["value"] for t, r in res.items()} for e, res in results.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"lm-eval via vLLM server: {vllm_s:.1f}s (+{startup:.1f}s start-up); via hf backend: {hf_s:.1f}s; "
          f"ratio hf/vLLM = {hf_s / vllm_s:.2f}x ({hf_s / (vllm_s + startup):.2f}x counting start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
