"""`quantgate` command line: quantize -> eval -> bench -> gate -> report -> deploy, each reading the last one's
artifacts. The run context (run folder, platform, target, serving overrides) is resolved here, once.

Exit codes (see qgcore.errors): 0 ok, 1 tool error / missing artifact, 2 gate rejected,
3 invalid config, 4 model not found, 5 hub unreachable, 6 group size, 7 unsupported GPU,
8 out of disk, 9 some variants failed (the rest finished and were kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from qgcore.errors import EXIT_CODES, EXIT_CONFIG, EXIT_ERROR, ConfigError, QuantgateError
from qgcore.paths import slug_for

RUNS_DEFAULT = Path(os.environ.get("QUANTGATE_RUNS", "runs"))
_EPILOG = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def _csv(value: str | None) -> list[str] | None:
    """A comma-separated option (--recipes, --tasks) as a list; None when not given."""
    return [r.strip() for r in value.split(",") if r.strip()] if value else None


def _sub(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model folder or hub id (org/name); default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipe names from recipes/ (default: all, the reference first)")
    p.add_argument("--runs", type=Path, default=RUNS_DEFAULT, help="output root (default: runs/)")
    p.add_argument("--target-gpu", default=None,
                   help="GPU the checkpoints and the verdict are for (H100, L4, A100, or a compute capability like "
                        "8.9); quantize refuses recipes it cannot serve (default: the platform measured on)")


def _serving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", default=None, metavar="N|name=N,...",
                   help="tensor-parallel size of every variant (N) or per variant (bf16=4,fp8=2); default: from each "
                        "variant's weights over one GPU's memory (the function `quantgate plan` uses), 1 on CPU")
    p.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                   help="cap on the served context, for memory (default: the model's own max_position_embeddings)")
    p.add_argument("--startup-timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for a server (default: 600 + the checkpoint read at 100 MB/s)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (default: the built-in tasks and mmlu_pro where reachable)")
    p.add_argument("--include-path", type=Path, default=None, help="folder of user lm-eval task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="max items per task (quick runs)")
    p.add_argument("--emulate-unsupported", action="store_true",
                   help="score schemes no kernel serves here with transformers, labelled 'emulated (transformers)'")
    p.add_argument("--fixed-n", action="store_true",
                   help="score every task at its full n (default: binary tasks with at least the policy's "
                        "quality.sequential.min_items items stop early once their answer is settled)")
    p.add_argument("--divergence-docs", type=int, default=None, metavar="N",
                   help="documents for KL / top-1 agreement vs the reference by context depth; 0 turns it off "
                        "(default: 24; --demo: 3)")
    p.add_argument("--divergence-data", default=None, metavar="FILE|DATASET",
                   help="text file or Hugging Face dataset id (its `text` column) for those documents "
                        "(default: held-out Python stdlib docstrings, offline)")
    p.add_argument("--divergence-tokens", type=int, default=None, metavar="T",
                   help="tokens per divergence document (default: 2048 on CPU, 16384 on a GPU; at most the context)")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="bench YAML (workloads, sweep, repeats, SLO, prices; default: GPU defaults, or the CPU file)")
    p.add_argument("--max-load", type=int, default=None, help="the sweep's highest concurrency")


def _alpha() -> str:
    """The shipped policy's alpha, for help texts (read from its one home, without validating)."""
    import yaml

    from reports.policy import DEFAULT_POLICY

    return str(yaml.safe_load(DEFAULT_POLICY.read_text())["quality"]["alpha"])


def _policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, default=None,
                   help=f"gate policy YAML, merged key by key over the shipped one (reports/policy.default.yaml: "
                        f"quality.alpha {_alpha()} = the chance a run promotes any variant whose true loss on a "
                        "task is at its margin)")


def _count(value: int | None, what: str, least: int = 0) -> int | None:
    if value is not None and value < least:
        raise ConfigError(f"{what} {value}: give a count >= {least}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantgate", description="Quantize an LLM, serve every variant with vLLM, score, bench, gate.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = _sub(sub, "quantize", "recipes -> compressed-tensors checkpoints + manifest.json")
    _common(q)
    q.add_argument("--force", action="store_true", help="rebuild even when the manifest's content key matches")
    q.add_argument("--demo", action="store_true", help="the demo's smaller calibration and AWQ search (recorded)")

    e = _sub(sub, "eval", "serve each checkpoint with vLLM and score it with lm-eval")
    _common(e)
    _eval_args(e)
    _serving(e)
    _policy(e)
    e.add_argument("--force", action="store_true", help="ignore cached results")
    e.add_argument("--verify", action="store_true",
                   help="hash every checkpoint file (default: size + mtime, hashing only what changed)")

    b = _sub(sub, "bench", "capacity at the SLO, throughput vs the reference, memory, cost (vllm bench serve)")
    _common(b)
    _bench_args(b)
    _serving(b)
    _policy(b)  # its performance.throughput_margin is what the pairs are stopped by
    b.add_argument("--force", action="store_true", help="rerun even when bench.json matches")

    r = _sub(sub, "report", "render runs/<slug>/report.html from verdict.json and the artifacts")
    r.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the default model's)")

    g = _sub(sub, "gate", "decide promote/reject/inconclusive; writes verdict.json + JUnit")
    g.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the default model's)")
    _policy(g)
    g.add_argument("--require", default=None, help="exit 2 unless this variant is promoted")
    g.add_argument("--junit", type=Path, default=None, help="JUnit XML path (default: <run>/verdict.junit.xml)")
    g.add_argument("--verify", action="store_true", help="hash every checkpoint file before gating")

    d = _sub(sub, "deploy", "a deploy kit per promoted variant: Kubernetes, KEDA autoscaling, alerts")
    d.add_argument("run", type=Path, nargs="?", default=None, help="run folder (default: the default model's)")
    d.add_argument("--all", dest="every", action="store_true", help="a kit for every served variant, not only the "
                                                                    "promoted ones")

    a = _sub(sub, "all", "quantize -> eval -> bench -> gate -> report -> deploy; the exit code CI should read")
    _common(a)
    _eval_args(a)
    _bench_args(a)
    _serving(a)
    _policy(a)
    a.add_argument("--require", default=None, help="exit 2 unless this variant is promoted")
    a.add_argument("--deploy-all", action="store_true", help="deploy kits for every served variant")
    a.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one process, stage after stage (default); ray: cells on a Ray cluster")
    a.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster on this machine)")
    a.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs each Ray cell asks for (default 1)")
    a.add_argument("--demo", action="store_true",
                   help="demo sizing where not given (the built-in tasks' demo sizes, a short CPU bench, smaller "
                        "calibration; recorded in run.json and the report); exit 0 when only the gate said no")
    pl = _sub(sub, "plan", "cell schedule and estimated wall time on N GPUs, from a measured run")
    from quantgate.plan import add_args

    add_args(pl)
    return parser


def _run(args: argparse.Namespace) -> Path:
    return args.run if args.run is not None else RUNS_DEFAULT / slug_for(None)


def context(args: argparse.Namespace, **over: Any) -> Any:
    from quantgate.context import resolve

    return resolve(runs_root=args.runs, model=args.model, target_gpu=args.target_gpu,
                   tensor_parallel=getattr(args, "tensor_parallel", None),
                   max_model_len=getattr(args, "max_model_len", None),
                   startup_timeout=getattr(args, "startup_timeout", None), **over)


def eval_request(args: argparse.Namespace, demo: Any = None) -> Any:
    from evals.stage import EvalRequest

    return EvalRequest(recipes=_csv(args.recipes), tasks=demo.tasks if demo else _csv(args.tasks),
                       include_path=args.include_path, limit=demo.limit if demo else _count(args.limit, "--limit", 1),
                       task_limits=demo.task_limits if demo else {}, emulate=args.emulate_unsupported,
                       force=getattr(args, "force", False), verify=getattr(args, "verify", False),
                       divergence_docs=demo.divergence_docs if demo else _count(args.divergence_docs,
                                                                                "--divergence-docs"),
                       divergence_data=args.divergence_data,
                       divergence_tokens=_count(args.divergence_tokens, "--divergence-tokens", 2),
                       demo=demo.record() if demo else None)


def stopping(args: argparse.Namespace, ctx: Any) -> Any:
    from evals.stage import Stopping
    from quantgate.context import declared_k
    from reports.policy import load_policy

    return Stopping(load_policy(args.policy).quality, declared_k(ctx), fixed_n=args.fixed_n)


def throughput_margin(args: argparse.Namespace) -> float | None:
    """The margin the bench's pairs are stopped by: the gate's, from the same policy file."""
    from reports.policy import load_policy

    return load_policy(args.policy)["performance"].throughput_margin


def quantize(args: argparse.Namespace) -> int:
    from qgcore.device import parse_target
    from quantgate.context import record_run
    from quantgate.demo import DEMO_SIZING
    from quantize.recipe import load_recipes
    from quantize.stage import run_stage

    ctx = context(args)
    chosen = load_recipes(_csv(args.recipes))
    code = run_stage(model=args.model, recipes=chosen, run_dir=ctx.run_dir, target=parse_target(args.target_gpu),
                     force=args.force, sizing=DEMO_SIZING if args.demo else None)
    if ctx.run_dir.is_dir() and any(ctx.run_dir.glob("*/manifest.json")):
        record_run(ctx, declared=[r.name for r in chosen], families={r.name: r.family for r in chosen})
    return code


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "quantize":
        return quantize(args)
    if args.command == "eval":
        from evals.stage import run_eval_stage
        from quantgate.context import record_run

        ctx = context(args)
        req = eval_request(args)  # options checked before anything is written
        record_run(ctx)
        return run_eval_stage(ctx, replace(req, stopping=stopping(args, ctx)))
    if args.command == "bench":
        from evals.bench_stage import BenchRequest, run_bench_stage
        from quantgate.context import record_run

        ctx = context(args)
        breq = BenchRequest(recipes=_csv(args.recipes), config_path=args.config,
                            max_load=_count(args.max_load, "--max-load", 1), force=args.force,
                            throughput_margin=throughput_margin(args))
        record_run(ctx)
        return run_bench_stage(ctx, breq)
    if args.command == "report":
        from reports.stage import run_report

        return run_report(_run(args))
    if args.command == "gate":
        from reports.stage import run_gate

        return run_gate(_run(args), policy_path=args.policy, require=args.require, junit=args.junit,
                        verify=args.verify)
    if args.command == "deploy":
        from reports.stage import run_deploy

        return run_deploy(_run(args), every=args.every)
    if args.command == "plan":
        from quantgate.plan import run_plan

        return run_plan(args)
    if args.command == "all":
        return run_all(args)
    raise AssertionError(args.command)  # argparse restricts choices


def run_all(args: argparse.Namespace) -> int:
    from evals.bench_stage import BenchRequest
    from quantgate.demo import demo_settings
    from quantgate.pipeline import AllRequest, demo_exit

    ctx = context(args, executor=args.executor)
    demo = demo_settings(tasks=_csv(args.tasks), limit=args.limit, divergence_docs=args.divergence_docs,
                         bench_config=args.config, cpu=ctx.platform.kind == "cpu") if args.demo else None
    bench = BenchRequest(recipes=_csv(args.recipes), config_path=demo.bench_config if demo else args.config,
                         max_load=_count(args.max_load, "--max-load", 1), throughput_margin=throughput_margin(args))
    req = AllRequest(recipes=_csv(args.recipes), eval=eval_request(args, demo), bench=bench, policy=args.policy,
                     require=args.require, target_gpu=args.target_gpu, demo=bool(args.demo),
                     deploy_all=args.deploy_all)
    if args.executor == "ray":
        from quantgate.cells import run_all_ray

        code = run_all_ray(ctx, req, address=args.ray_address, cpus_per_cell=args.cpus_per_cell,
                           stopping=lambda: stopping(args, ctx))
    else:
        from quantgate.pipeline import run_all as run_local

        code = run_local(ctx, req, stopping=lambda: stopping(args, ctx))
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
