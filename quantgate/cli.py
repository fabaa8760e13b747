"""`quantgate` command line: quantize -> eval -> bench -> report -> gate, each reading the last one's JSON.

Exit codes (see qgcore.errors): 0 ok, 1 tool error / missing artifact, 2 gate rejected,
3 invalid config, 4 model not found, 5 hub unreachable, 6 group size, 7 unsupported GPU,
8 out of disk, 9 some variants failed (the rest finished and were kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qgcore.errors import EXIT_CODES, EXIT_CONFIG, EXIT_ERROR, ConfigError, QuantgateError
from qgcore.paths import DEFAULT_SLUG

RUNS_DEFAULT = Path(os.environ.get("QUANTGATE_RUNS", "runs"))
_EPILOG = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def _recipes(value: str | None) -> list[str] | None:
    return [r.strip() for r in value.split(",") if r.strip()] if value else None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model folder or hub id (org/name); default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipe names from recipes/ (default: all, bf16 first)")
    p.add_argument("--runs", type=Path, default=RUNS_DEFAULT, help="output root (default: runs/)")


def _divergence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--divergence-docs", type=int, default=None, metavar="N",
                   help="documents (each filling the served context) for KL / top-1 agreement vs bf16 by context "
                        "depth; 0 turns it off (default: 24; --demo: 3)")
    p.add_argument("--divergence-data", default=None, metavar="FILE|DATASET",
                   help="text file or Hugging Face dataset id (its `text` column) for those documents "
                        "(default: held-out Python stdlib docstrings, offline)")


def _docs(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ConfigError(f"--divergence-docs {value}: give a count >= 0 (0 turns divergence off)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantgate", description="Quantize an LLM, serve every variant with vLLM, score, bench, gate.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="recipes -> compressed-tensors checkpoints + manifest.json",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(q)
    q.add_argument("--target-gpu", default=None,
                   help="GPU the checkpoints are for (H100, L4, A100, or a compute capability like 8.9); "
                        "recipes it cannot run fail before any work (default: no check)")
    q.add_argument("--force", action="store_true", help="rebuild even when the manifest's content key matches")

    e = sub.add_parser("eval", help="serve each checkpoint with vLLM and score it with lm-eval",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(e)
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks or suite names (default: the eval policy's list)")
    e.add_argument("--include-path", type=Path, default=None, help="folder of user lm-eval task YAMLs")
    e.add_argument("--limit", type=int, default=None, help="max items per task (quick runs)")
    e.add_argument("--emulate-unsupported", action="store_true",
                   help="score schemes vLLM cannot run here with transformers, labelled 'emulated (transformers)'")
    e.add_argument("--force", action="store_true", help="ignore cached results")
    _divergence_args(e)
    e.add_argument("--verify", action="store_true",
                   help="hash every checkpoint file (default: size + mtime, hashing only what changed)")

    b = sub.add_parser("bench", help="throughput / latency / memory / cost per variant (vllm bench serve)",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(b)
    b.add_argument("--config", type=Path, default=None, help="bench YAML (concurrency, lengths, SLO, prices)")
    b.add_argument("--concurrency", default=None, help="comma-separated levels, e.g. 1,8,32")
    b.add_argument("--force", action="store_true", help="rerun even when bench.json matches")

    r = sub.add_parser("report", help="render runs/<slug>/report.html from the JSON artifacts",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the default model's)")
    r.add_argument("--policy", type=Path, default=None, help="gate policy YAML (default: shipped policy)")
    r.add_argument("--verify", action="store_true", help="hash every checkpoint file before reporting")

    g = sub.add_parser("gate", help="decide promote/reject/inconclusive; writes verdict.json + JUnit",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the default model's)")
    g.add_argument("--policy", type=Path, default=None, help="gate policy YAML (default: shipped policy)")
    g.add_argument("--require", default=None, help="exit 2 unless this variant is promoted")
    g.add_argument("--junit", type=Path, default=None, help="JUnit XML path (default: <run>/verdict.junit.xml)")
    g.add_argument("--verify", action="store_true", help="hash every checkpoint file before gating")
    a = sub.add_parser("all", help="quantize -> eval -> bench -> report -> gate; the exit code CI should read",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(a)
    a.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (default: the built-in suite)")
    a.add_argument("--limit", type=int, default=None, help="max items per task")
    a.add_argument("--include-path", type=Path, default=None, help="folder of user lm-eval task YAMLs")
    a.add_argument("--emulate-unsupported", action="store_true", help="as for `eval`")
    _divergence_args(a)
    a.add_argument("--target-gpu", default=None, help="as for `quantize`")
    a.add_argument("--concurrency", default=None, help="as for `bench`")
    a.add_argument("--config", type=Path, default=None, help="bench YAML, as for `bench`")
    a.add_argument("--policy", type=Path, default=None, help="gate policy YAML")
    a.add_argument("--require", default=None, help="exit 2 unless this variant is promoted")
    a.add_argument("--verify", action="store_true", help="hash every checkpoint file before measuring")
    a.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one process, stage after stage (default); ray: cells on a Ray cluster")
    a.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster on this machine)")
    a.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs each Ray cell asks for (default 1)")
    a.add_argument("--demo", action="store_true",
                   help="demo sizing where not given (100 items, the tasks the default model can decide on, a short "
                        "CPU bench; recorded in demo.json and the report); exit 0 when only the gate said no")
    pl = sub.add_parser("plan", help="cell schedule and estimated wall time on N GPUs, from a measured run",
                        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from quantgate.plan import add_args

    add_args(pl)
    return parser


def _default_run(args: argparse.Namespace) -> Path:
    if args.run is not None:
        return args.run
    return RUNS_DEFAULT / DEFAULT_SLUG


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "quantize":
        from quantize.stage import run_stage

        return run_stage(model=args.model, recipes=_recipes(args.recipes), runs_root=args.runs,
                         target_gpu=args.target_gpu, force=args.force)
    if args.command == "eval":
        from evals.stage import run_eval_stage

        return run_eval_stage(model=args.model, recipes=_recipes(args.recipes), runs_root=args.runs,
                              tasks=_recipes(args.tasks), include_path=args.include_path, limit=args.limit,
                              emulate=args.emulate_unsupported, force=args.force, verify=args.verify,
                              divergence_data=args.divergence_data,
                              divergence_docs=_docs(args.divergence_docs))
    if args.command == "bench":
        from evals.bench_stage import run_bench_stage

        return run_bench_stage(model=args.model, recipes=_recipes(args.recipes), runs_root=args.runs,
                               config_path=args.config, concurrency=args.concurrency, force=args.force)
    if args.command == "report":
        from reports.stage import run_report

        return run_report(_default_run(args), policy_path=args.policy, verify=args.verify)
    if args.command == "gate":
        from reports.stage import run_gate

        return run_gate(_default_run(args), policy_path=args.policy, require=args.require, junit=args.junit,
                        verify=args.verify)
    if args.command == "plan":
        from quantgate.plan import run_plan

        return run_plan(args)
    if args.command == "all" and args.executor == "ray":
        return _all_ray(args)
    if args.command == "all":
        from quantgate.pipeline import demo_exit, run_all

        code = run_all(model=args.model, recipes=_recipes(args.recipes), runs_root=args.runs,
                       tasks=_recipes(args.tasks), limit=args.limit, include_path=args.include_path,
                       emulate=args.emulate_unsupported,
                       target_gpu=args.target_gpu, concurrency=args.concurrency, bench_config=args.config,
                       policy=args.policy, require=args.require, verify=args.verify, demo=args.demo,
                       divergence_docs=_docs(args.divergence_docs),
                       divergence_data=args.divergence_data)
        return demo_exit(code) if args.demo else code
    raise AssertionError(args.command)  # argparse restricts choices


def _all_ray(args: argparse.Namespace) -> int:
    from quantgate.cells import RunSpec, run_all_ray
    from quantgate.pipeline import DEMO_DIVERGENCE_DOCS, DEMO_SIZING, demo_exit, demo_settings

    limit, tasks, config, docs = args.limit, _recipes(args.tasks), args.config, _docs(args.divergence_docs)
    if args.demo:
        from evals.bench_stage import DEMO_CPU_CONFIG
        from evals.serve import on_cuda
        from qgcore.paths import slug_for

        docs = DEMO_DIVERGENCE_DOCS if docs is None else docs
        limit, tasks, config = demo_settings(args.runs / slug_for(args.model), limit=limit, tasks=tasks,
                                             bench_config=config, cuda=on_cuda(), demo_cpu_bench=DEMO_CPU_CONFIG,
                                             divergence_docs=docs)
    spec = RunSpec(runs_root=str(args.runs.resolve()), model=args.model, tasks=tasks, limit=limit,
                   include_path=str(args.include_path.resolve()) if args.include_path else None,
                   target_gpu=args.target_gpu, concurrency=args.concurrency,
                   bench_config=str(config.resolve()) if config else None,
                   divergence_docs=docs, divergence_data=args.divergence_data,
                   sizing=DEMO_SIZING if args.demo else None)
    code = run_all_ray(spec=spec, recipes=_recipes(args.recipes), address=args.ray_address,
                       emulate=args.emulate_unsupported, policy=args.policy, require=args.require,
                       cpus_per_cell=args.cpus_per_cell)
    return demo_exit(code) if args.demo else code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 means bad usage -> our config code, 2 is the gate's
        return EXIT_CONFIG if exc.code == 2 else int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return dispatch(args)
    except QuantgateError as err:
        print(f"quantgate: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("quantgate: interrupted; finished variants are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a tool bug: one line, the traceback only with -v
        if args.verbose:
            raise
        print(f"quantgate: internal error: {type(err).__name__}: {err} (rerun with -v for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
