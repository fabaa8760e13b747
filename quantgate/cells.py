"""Scale-out: the variant x stage matrix as cells, run by the `local` executor (one process, in order) or
the `ray` executor (a Ray cluster: a local one, `ray start` nodes, or KubeRay).

A cell is (quantize, variant), (eval, variant) or (bench, variant). It owns at most one vLLM server, reads
and writes only its variant's artifacts, and finishes through the stages' own content-keyed caches, so
running it twice redoes nothing. bf16 is scored once (its eval cell comes first; every variant's eval
cell reuses its cached results). Between the eval and bench cells the driver merges: the eval stage runs
over the cached results (no server), writing exactly the eval.json / divergence.json it writes today, and
emulating what vLLM could not serve; then bench cells write bench.json; then gate and report as ever.

Storage contract: the run folder, the model and the cache must sit at the same path on every node (NFS, a
shared volume). The driver leaves a token in the run folder; a cell that cannot see it fails at once with
a one-line error naming the path (exit 1). Results travel back through Ray as small JSON; checkpoints
never do.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qgcore.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, QuantgateError
from qgcore.paths import slug_for

Kind = Literal["quantize", "eval", "bench"]
TOKEN_DIR = ".quantgate-storage"
MAX_RETRIES = 3  # a cell is retried this often when its node or worker dies


class StorageError(QuantgateError):
    """A worker cannot see the shared run folder."""

    exit_code = EXIT_ERROR


@dataclass(frozen=True)
class Cell:
    kind: Kind
    variant: str
    needs: tuple[str, ...] = ()
    gpus: int = 0  # GPUs the cell asks the cluster for (tensor-parallel size of the served variant)
    cpus: float | None = None  # CPUs it asks for (None: the executor's --cpus-per-cell)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.variant}"


@dataclass(frozen=True)
class RunSpec:
    """Everything a cell needs to do its part, as plain values (it travels to Ray workers)."""

    runs_root: str  # absolute
    model: str | None = None
    tasks: list[str] | None = None
    limit: int | None = None
    include_path: str | None = None
    target_gpu: str | None = None
    concurrency: str | None = None
    bench_config: str | None = None
    divergence_docs: int | None = None
    divergence_data: str | None = None
    sizing: dict[str, int] | None = None  # quantize.recipe.Sizing (the demo's)
    cpu_threads: int | None = None  # CPU-only clusters: threads per cell (its Ray CPU request)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / slug_for(self.model)


def tensor_parallel(extra_args: list[str]) -> int:
    """The tensor-parallel size a recipe's serve args ask for (1 if none)."""
    for i, a in enumerate(extra_args):
        if a in ("--tensor-parallel-size", "-tp") and i + 1 < len(extra_args):
            return int(extra_args[i + 1])
        if a.startswith("--tensor-parallel-size="):
            return int(a.split("=", 1)[1])
    return 1


def plan_cells(recipes: list[str], tp: dict[str, int], *, gpu: bool, bench_cpus: float | None = None) -> list[Cell]:
    """The cell graph: quantize each; eval bf16 first, each variant after its checkpoint and bf16's eval;
    bench each after the merged eval (the bench skips what the eval could not serve). `bench_cpus`: on CPU
    nodes a bench cell takes a whole node, so no two benches share cores (that skews throughput ratios)."""
    order = ["bf16", *[r for r in recipes if r != "bf16"]]
    cells = [Cell("quantize", r, gpus=1 if gpu else 0) for r in order]
    for r in order:
        needs = (f"quantize:{r}",) + (() if r == "bf16" else ("eval:bf16",))
        cells.append(Cell("eval", r, needs, tp.get(r, 1) if gpu else 0))
    cells += [Cell("bench", r, tuple(f"eval:{x}" for x in order), tp.get(r, 1) if gpu else 0,
                   None if gpu else bench_cpus) for r in order]
    return cells


# ---- inside a cell (any process, any node) ----

def _marker(spec: RunSpec, cell: Cell) -> Path:
    return spec.run_dir / "cells" / f"{cell.kind}-{cell.variant}.json"


def check_storage(spec: RunSpec) -> None:
    token = Path(spec.runs_root) / TOKEN_DIR / spec.run_id
    if not token.is_file():
        raise StorageError(f"worker {socket.gethostname()} (pid {os.getpid()}) cannot see {spec.runs_root}: the run "
                           "folder, model and cache must be on storage every Ray node mounts at the same path "
                           "(NFS or a shared volume; see examples/ray/README.md)")


def run_cell(spec: RunSpec, cell: Cell) -> dict[str, Any]:
    """Do one cell; return a small JSON-able result. A cell this run already finished is not redone."""
    check_storage(spec)
    if spec.cpu_threads and cell.kind != "bench":  # cells share CPU machines: stay within their Ray CPUs
        import torch

        os.environ["QUANTGATE_CPU_THREADS"] = str(spec.cpu_threads)
        torch.set_num_threads(spec.cpu_threads)
    elif cell.kind == "bench":  # a bench cell has its node to itself: served as vLLM's defaults, as locally
        os.environ.pop("QUANTGATE_CPU_THREADS", None)
    marker = _marker(spec, cell)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("run_id") == spec.run_id:
            return done | {"reused": True}
    marker.parent.mkdir(parents=True, exist_ok=True)
    with (marker.with_suffix(".starts")).open("a") as fh:  # one line per attempt: retries are visible
        fh.write(f"{spec.run_id} {socket.gethostname()} {os.getpid()} {time.time():.1f}\n")
    started = time.perf_counter()
    result: dict[str, Any] = {"id": cell.id, "run_id": spec.run_id, "node": socket.gethostname(), "pid": os.getpid()}
    result |= _HANDLERS[cell.kind](spec, cell)
    result["seconds"] = round(time.perf_counter() - started, 2)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(marker)
    return result


def _quantize(spec: RunSpec, cell: Cell) -> dict[str, Any]:
    from quantize.stage import run_stage

    code = run_stage(model=spec.model, recipes=[cell.variant], runs_root=Path(spec.runs_root),
                     target_gpu=spec.target_gpu, sizing=spec.sizing)
    return {"status": "ok" if code == EXIT_OK else "failed", "exit_code": code}


def _eval(spec: RunSpec, cell: Cell) -> dict[str, Any]:
    from evals.stage import prepare_eval

    ctx = prepare_eval(model=spec.model, recipes=[cell.variant], runs_root=Path(spec.runs_root), tasks=spec.tasks,
                       include_path=Path(spec.include_path) if spec.include_path else None, limit=spec.limit,
                       divergence_docs=spec.divergence_docs, divergence_data=spec.divergence_data, quiet=True)
    m = next(x for x in ctx.manifests if x.recipe == cell.variant)
    run = ctx.score(m)
    return {"status": run.status, "eval": run.model_dump(mode="json")}


def _bench(spec: RunSpec, cell: Cell) -> dict[str, Any]:
    from evals.bench_stage import bench_recipe

    status = bench_recipe(model=spec.model, recipe=cell.variant, runs_root=Path(spec.runs_root),
                          config_path=Path(spec.bench_config) if spec.bench_config else None,
                          concurrency=spec.concurrency, force=False)
    return {"status": status}


_HANDLERS: dict[str, Callable[[RunSpec, Cell], dict[str, Any]]] = {"quantize": _quantize, "eval": _eval,
                                                                   "bench": _bench}


# ---- the driver ----

def write_token(spec: RunSpec) -> None:
    token = Path(spec.runs_root) / TOKEN_DIR / spec.run_id
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(json.dumps(asdict(spec)) + "\n")


class RayExecutor:
    """Cells as Ray tasks: each asks for its CPUs/GPUs, is retried (bounded) when its worker or node dies,
    and Ctrl-C cancels this run's tasks (finished cells stay)."""

    def __init__(self, address: str | None, cpus_per_cell: float = 1.0, retries: int = MAX_RETRIES):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
        self.cpus, self.retries = cpus_per_cell, retries
        self.remote = ray.remote(run_cell)

    def run(self, spec: RunSpec, cells: list[Cell], on_done: Callable[[Cell, dict[str, Any]], None],
            before: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run `cells` as their needs finish (`before`: results of cells already done); return their results."""
        ray = self.ray
        results: dict[str, Any] = dict(before or {})
        pending: dict[Any, Cell] = {}
        waiting = list(cells)
        try:
            while waiting or pending:
                for c in [c for c in waiting if all(n in results for n in c.needs)]:
                    waiting.remove(c)
                    if any(results[n].get("status") == "failed" and n.startswith("quantize:") for n in c.needs):
                        results[c.id] = {"id": c.id, "status": "failed", "reason": "its checkpoint failed"}
                        continue
                    ref = self.remote.options(num_cpus=c.cpus or self.cpus, num_gpus=c.gpus, max_retries=self.retries,
                                              retry_exceptions=False).remote(spec, c)
                    pending[ref] = c
                if not pending:
                    if waiting and not any(all(n in results for n in c.needs) for c in waiting):
                        raise RuntimeError(f"cells can never start: {[c.id for c in waiting]}")
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready[0])
                try:
                    results[cell.id] = ray.get(ready[0])
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None) or err
                    if isinstance(cause, QuantgateError):  # bad input or storage: stop the run, one line
                        raise QuantgateError(str(cause), exit_code=cause.exit_code) from None
                    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                    results[cell.id] = {"id": cell.id, "status": "failed", "reason": f"{type(cause).__name__}: {first}"}
                except ray.exceptions.RayError as err:  # retries used up: the worker or node kept dying
                    results[cell.id] = {"id": cell.id, "status": "failed",
                                        "reason": f"{type(err).__name__} after {self.retries} retries"}
                on_done(cell, results[cell.id])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)  # kills the worker; its vLLM server dies with it (PDEATHSIG)
            raise
        return {c.id: results[c.id] for c in cells if c.id in results}


def run_all_ray(*, spec: RunSpec, recipes: list[str] | None, address: str | None, emulate: bool,
                policy: Path | None, require: str | None, cpus_per_cell: float = 1.0) -> int:
    """`quantgate all --executor ray`: quantize + eval cells, the eval merge, bench cells, then gate + report."""
    from evals.serve import on_cuda
    from evals.stage import run_eval_stage
    from qgcore.artifacts import EvalRun
    from quantgate.pipeline import run_stages
    from quantize.model import resolve_model
    from quantize.recipe import load_recipes
    from reports.stage import run_gate, run_report

    chosen = load_recipes(recipes)
    names = [r.name for r in chosen]
    if not on_cuda() and spec.cpu_threads is None:
        spec = replace(spec, cpu_threads=max(1, int(cpus_per_cell)))
    resolve_model(spec.model)  # once, here: the default model's conversion is cached before cells share it
    write_token(spec)
    tp = {r.name: tensor_parallel(list(r.serve.extra_args)) for r in chosen}
    executor = RayExecutor(address, cpus_per_cell)
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in executor.ray.nodes() if n["Alive"]), default=1.0)
    cells = plan_cells(names, tp, gpu=on_cuda(), bench_cpus=max(node_cpus, cpus_per_cell))
    results: dict[str, Any] = {}

    def note(cell: Cell, res: dict[str, Any]) -> None:
        print(f"quantgate[ray]: {cell.id}: {res.get('status')} on {res.get('node', '?')}"
              f"{' (reused)' if res.get('reused') else ''} {res.get('seconds', '')}".rstrip(), flush=True)

    def cells_of(kinds: tuple[str, ...]) -> Callable[[], int]:
        def stage() -> int:
            todo = [c for c in cells if c.kind in kinds]
            done = executor.run(spec, todo, note, before=results)
            results.update(done)
            failed = [k for k, r in done.items() if r.get("status") == "failed"]
            return EXIT_PARTIAL if failed else EXIT_OK
        return stage

    def merge() -> int:
        scored = {r["id"].split(":", 1)[1]: EvalRun.model_validate(r["eval"])
                  for r in results.values() if r.get("id", "").startswith("eval:") and "eval" in r}
        return run_eval_stage(model=spec.model, recipes=[n for n in names if f"eval:{n}" in results and
                                                         results[f"quantize:{n}"].get("status") != "failed"],
                              runs_root=Path(spec.runs_root), tasks=spec.tasks,
                              include_path=Path(spec.include_path) if spec.include_path else None, limit=spec.limit,
                              emulate=emulate, force=False, divergence_data=spec.divergence_data, scored=scored,
                              divergence_docs=spec.divergence_docs)

    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    code = run_stages({"quantize+eval cells": cells_of(("quantize", "eval")), "eval merge": merge,
                       "bench cells": cells_of(("bench",))},
                      lambda: run_gate(run_dir, policy_path=policy, require=require, junit=None),
                      run_dir / "timings.json", report=lambda: run_report(run_dir, policy_path=policy))
    print(f"report: {run_dir / 'report.html'}  verdict: {run_dir / 'verdict.json'}  exit: {code}")
    return code
