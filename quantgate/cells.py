"""Scale-out: the run as cells on a Ray cluster (a local one, `ray start` nodes, or KubeRay).

Cells: (quantize, variant); (eval, variant, round): one scoring session of the eval stage's plan
(evals.stage), so group-sequential tasks stop early on Ray exactly as they do locally; (bench, variant).
Each cell runs in a worker process of its own (`max_calls=1`: quantize's and vLLM's memory is gone when the
cell ends), asks the cluster for its GPUs (from the cluster's resources, never the driver's own device: a
GPU-less KubeRay head still places every server on a GPU node), reads and writes only its variant's
artifacts, and finishes through the stages' content-keyed caches, so running it twice redoes nothing.
Dependencies are ObjectRefs (Ray starts a cell when its inputs exist); the driver decides the next eval
round from what the last one left on disk, then writes eval.json / divergence.json (and emulates) itself.

Storage contract: the run folder, the model and the cache sit at the same path on every node (NFS, a shared
volume). The driver leaves a token in the run folder; a cell that cannot see it fails at once with a
one-line error naming the path (exit 1). HF_TOKEN / HF_HOME travel in the runtime environment.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qgcore.device import GPUS, Platform, gpu_key
from qgcore.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, QuantgateError
from qgcore.run import RunContext

if TYPE_CHECKING:
    from evals.stage import Stopping
    from quantgate.pipeline import AllRequest

Kind = Literal["quantize", "eval", "bench"]
TOKEN_DIR = ".quantgate-storage"
MAX_RETRIES = 3  # a cell is retried this often when its node or worker dies
PASSED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
              "QUANTGATE_SERVE_PYTHON", "QUANTGATE_CACHE")


class StorageError(QuantgateError):
    """A worker cannot see the shared run folder."""

    exit_code = EXIT_ERROR


@dataclass(frozen=True)
class Cell:
    kind: Kind
    variant: str
    needs: tuple[str, ...] = ()
    gpus: int = 0  # GPUs the cell asks the cluster for
    cpus: float | None = None  # CPUs it asks for (None: the executor's --cpus-per-cell)
    round: int = 0  # eval cells: the session round

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.variant}" + (f":{self.round}" if self.kind == "eval" else "")


def cell_graph(names: list[str], gpus: dict[str, int], *, bench_gpus: dict[str, int],
               bench_cpus: float | None = None) -> list[Cell]:
    """The cells of a run (the one graph the executor runs and `quantgate plan` schedules): quantize each;
    the first eval session of each after its checkpoint (the reference's and the variants' run side by
    side: scoring needs no other variant); bench each after every eval, the reference first (the variants'
    pairs run against its capacity)."""
    order = [names[0], *names[1:]]
    cells = [Cell("quantize", r, gpus=1 if gpus.get(r) else 0) for r in order]
    cells += [Cell("eval", r, (f"quantize:{r}",), gpus.get(r, 0)) for r in order]
    evals = tuple(f"eval:{r}:0" for r in order)
    cells.append(Cell("bench", order[0], evals, bench_gpus.get(order[0], 0), bench_cpus))
    cells += [Cell("bench", r, (*evals, f"bench:{order[0]}"), bench_gpus.get(r, 0), bench_cpus) for r in order[1:]]
    return cells


@dataclass(frozen=True)
class CellSpec:
    """What every cell needs, as plain values (it travels to the Ray workers)."""

    ctx: RunContext
    req: AllRequest
    stopping: Stopping | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


# ---- inside a cell (any process, any node) ----

def _marker(spec: CellSpec, cell: Cell) -> Path:
    return spec.ctx.run_dir / "cells" / f"{cell.id.replace(':', '-')}.json"


def check_storage(spec: CellSpec) -> None:
    token = spec.ctx.run_dir.parent / TOKEN_DIR / spec.run_id
    if not token.is_file():
        raise StorageError(f"worker {socket.gethostname()} (pid {os.getpid()}) cannot see {spec.ctx.run_dir.parent}: "
                           "the run folder, model and cache must be on storage every Ray node mounts at the same path "
                           "(NFS or a shared volume; see examples/ray/README.md)")


def run_cell(spec: CellSpec, cell: Cell, work: dict[str, Any] | None = None, *_deps: Any) -> dict[str, Any]:
    """Do one cell; return a small JSON-able result. A cell this run already finished is not redone. `_deps`:
    the results of the cells it waits for (passed as ObjectRefs, so Ray starts it once they exist)."""
    check_storage(spec)
    if spec.ctx.cpu_threads and cell.kind != "bench":  # cells share CPU machines: stay within their Ray CPUs
        import torch

        torch.set_num_threads(spec.ctx.cpu_threads)
    marker = _marker(spec, cell)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("run_id") == spec.run_id:
            return done | {"reused": True}
    marker.parent.mkdir(parents=True, exist_ok=True)
    with marker.with_suffix(".starts").open("a") as fh:  # one line per attempt: retries are visible
        fh.write(f"{spec.run_id} {socket.gethostname()} {os.getpid()} {time.time():.1f}\n")
    started = time.perf_counter()
    result: dict[str, Any] = {"id": cell.id, "run_id": spec.run_id, "node": socket.gethostname(), "pid": os.getpid()}
    result |= _HANDLERS[cell.kind](spec, cell, work)
    result["seconds"] = round(time.perf_counter() - started, 2)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(marker)
    return result


def _quantize(spec: CellSpec, cell: Cell, work: dict[str, Any] | None) -> dict[str, Any]:
    from quantgate.pipeline import quantize_in_own_process

    code = quantize_in_own_process(spec.ctx, recipes=[cell.variant], target_gpu=spec.req.target_gpu,
                                   demo=spec.req.demo)
    return {"status": "ok" if code == EXIT_OK else "failed", "exit_code": code}


def _eval(spec: CellSpec, cell: Cell, work: dict[str, Any] | None) -> dict[str, Any]:
    from dataclasses import asdict

    from evals.scoring import Work
    from evals.stage import EvalStage

    ref = spec.req.eval.recipes[0] if spec.req.eval.recipes else None
    recipes = [r for r in dict.fromkeys([ref, cell.variant]) if r]
    stage = EvalStage(spec.ctx, replace(spec.req.eval, recipes=recipes, stopping=spec.stopping), quiet=True)
    todo = Work(**work) if work is not None else next((w for w in stage.plan_round() if w.variant == cell.variant),
                                                      None)
    if todo is None:
        return {"status": "served", "session": None}
    res = stage.run_session(todo)
    return {"status": res.status, "session": asdict(res)}


def _bench(spec: CellSpec, cell: Cell, work: dict[str, Any] | None) -> dict[str, Any]:
    from evals.bench_stage import BenchStage
    from evals.variants import variant_manifests

    ref = variant_manifests(spec.ctx.run_dir, None)[0].recipe
    req = replace(spec.req.bench, recipes=list(dict.fromkeys([ref, cell.variant])))
    code = BenchStage(spec.ctx, req, quiet=True).run()
    return {"status": "ok" if code == EXIT_OK else "failed", "exit_code": code}


_HANDLERS: dict[str, Callable[[CellSpec, Cell, dict[str, Any] | None], dict[str, Any]]] = {
    "quantize": _quantize, "eval": _eval, "bench": _bench}


# ---- the driver ----

def cluster_platform(nodes: list[dict[str, Any]]) -> tuple[Platform, float]:
    """Where the cells' servers run, from the cluster's own resources (never the driver's device): the GPU
    nodes' accelerator type and the most GPUs one node has; and the most CPUs one node has."""
    alive = [n for n in nodes if n.get("Alive")]
    gpus = max((n["Resources"].get("GPU", 0.0) for n in alive), default=0.0)
    cpus = max((n["Resources"].get("CPU", 0.0) for n in alive), default=1.0)
    if gpus < 1:
        return Platform("cpu", source="Ray cluster (no GPU node)"), cpus
    accel = next((k.split(":", 1)[1] for n in alive for k in n["Resources"] if k.startswith("accelerator_type:")), "")
    key = gpu_key(accel) if accel else None
    g = GPUS.get(key) if key else None
    return Platform("cuda", key or accel or None, g.compute_capability if g else None, int(gpus),
                    int(g.memory_gib * 2**30) if g else None, source="Ray cluster resources"), cpus


def write_token(spec: CellSpec) -> None:
    token = spec.ctx.run_dir.parent / TOKEN_DIR / spec.run_id
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(spec.run_id + "\n")


class RayExecutor:
    """Cells as Ray tasks, one worker process each: each asks for its CPUs/GPUs, is retried (bounded) when its
    worker or node dies, and Ctrl-C cancels this run's tasks (finished cells stay)."""

    def __init__(self, address: str | None, cpus_per_cell: float = 1.0, retries: int = MAX_RETRIES):
        import ray

        self.ray = ray
        env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        self.cpus, self.retries = cpus_per_cell, retries
        # max_calls=1: a fresh worker process per cell (.options() cannot set it: ray_option_utils.py:378)
        self.remote = ray.remote(max_calls=1)(run_cell)
        self.pending: dict[Any, Cell] = {}

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.ray.nodes())

    def submit(self, spec: CellSpec, cell: Cell, work: dict[str, Any] | None = None, deps: tuple[Any, ...] = ()) -> Any:
        ref = self.remote.options(num_cpus=cell.cpus or self.cpus, num_gpus=cell.gpus, max_retries=self.retries,
                                  retry_exceptions=False).remote(spec, cell, work, *deps)
        self.pending[ref] = cell
        return ref

    def result(self, ref: Any) -> dict[str, Any]:
        """A finished cell's result; a failure becomes a failed result, bad input stops the run."""
        ray = self.ray
        cell = self.pending.pop(ref, None)
        cid = cell.id if cell else "?"
        try:
            return dict(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None) or err
            if isinstance(cause, QuantgateError):  # bad input, storage, a tool error: stop the run, one line
                raise QuantgateError(str(cause), exit_code=cause.exit_code) from None
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            return {"id": cid, "status": "failed", "reason": f"{type(cause).__name__}: {first}"}
        except ray.exceptions.RayError as err:  # retries used up: the worker or node kept dying
            return {"id": cid, "status": "failed", "reason": f"{type(err).__name__} after {self.retries} retries"}

    def wait_all(self, refs: list[Any], on_done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        out, left = [], list(refs)
        try:
            while left:
                ready, left = self.ray.wait(left, num_returns=1)
                res = self.result(ready[0])
                on_done(res)
                out.append(res)
        except BaseException:
            for ref in list(self.pending):
                self.ray.cancel(ref, force=True)  # kills the worker; its vLLM server dies with it (PDEATHSIG)
            raise
        return out


def run_all_ray(ctx: RunContext, req: AllRequest, *, address: str | None, cpus_per_cell: float,
                stopping: Callable[[], Stopping | None]) -> int:
    """`quantgate all --executor ray`: quantize + first eval sessions as cells, further eval rounds as the
    driver plans them, the eval merge in the driver, bench cells, then gate, report and deploy kits."""
    from evals.scoring import SessionResult
    from evals.stage import EvalStage
    from quantgate.context import record_run
    from quantgate.pipeline import run_stages
    from quantize.recipe import load_recipes
    from reports.stage import run_deploy, run_gate, run_report

    chosen = load_recipes(req.recipes)
    names = [r.name for r in chosen]
    executor = RayExecutor(address, cpus_per_cell)
    platform, node_cpus = cluster_platform(executor.nodes())
    ctx = replace(ctx, platform=platform, executor="ray",
                  cpu_threads=max(1, int(cpus_per_cell)) if platform.kind == "cpu" else None)
    if ctx.target.source != "TARGET_GPU":  # the verdict is for the cluster's GPUs, not the driver's machine
        ctx = replace(ctx, target=replace(platform, source="the Ray cluster measured on"))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}

    def note(res: dict[str, Any]) -> None:
        results[res["id"]] = res
        print(f"quantgate[ray]: {res['id']}: {res.get('status')} on {res.get('node', '?')}"
              f"{' (reused)' if res.get('reused') else ''} {res.get('seconds', '')}".rstrip(), flush=True)

    spec_box: dict[str, CellSpec] = {}

    def spec() -> CellSpec:
        if "s" not in spec_box:
            spec_box["s"] = CellSpec(ctx, replace(req, eval=replace(req.eval, recipes=names)), None)
            write_token(spec_box["s"])
        return spec_box["s"]

    def first_cells() -> int:
        """Quantize each variant; each variant's first eval session as soon as its checkpoint exists."""
        s = spec()
        quant = {n: executor.submit(s, Cell("quantize", n, gpus=1 if platform.kind == "cuda" else 0)) for n in names}
        executor.wait_all([quant[names[0]]], note)  # the reference first: run.json names it, the rest need it
        record_run(ctx, declared=names, families={r.name: r.family for r in chosen})
        s = spec_box["s"] = replace(s, stopping=stopping())
        gpus = _gpus(ctx)
        evals = [executor.submit(s, Cell("eval", n, gpus=gpus.get(n, 0)), None,
                                 (quant[n],) if n != names[0] else ()) for n in names]
        executor.wait_all([q for n, q in quant.items() if n != names[0]] + evals, note)
        record_run(ctx)
        failed = [k for k, r in results.items() if r.get("status") == "failed"]
        return EXIT_PARTIAL if failed else EXIT_OK

    def more_rounds() -> int:
        """The eval rounds after the first, planned by the driver from what is on disk; then the merge."""
        s = spec()
        present = [n for n in names if (ctx.run_dir / n / "manifest.json").is_file()]
        stage = EvalStage(ctx, replace(req.eval, recipes=present, stopping=s.stopping))
        for r in results.values():
            sess = r.get("session")
            if r["id"].startswith("eval:") and sess:
                stage.record(SessionResult(**sess))
        gpus = _gpus(ctx)
        rnd = 0
        while work := stage.plan_round():
            rnd += 1
            refs = [executor.submit(s, Cell("eval", w.variant, gpus=gpus.get(w.variant, 0), round=rnd),
                                    {"variant": w.variant, "engine": w.engine, "tasks": w.tasks,
                                     "divergence": w.divergence}) for w in work]
            for res in executor.wait_all(refs, note):
                if res.get("session"):
                    stage.record(SessionResult(**res["session"]))
        return stage.write()

    def benches() -> int:
        s = spec()
        bench_gpus = _bench_gpus(ctx)
        cpus = None if platform.kind == "cuda" else max(node_cpus, cpus_per_cell)  # a bench takes a whole CPU node
        present = [n for n in names if (ctx.run_dir / n / "manifest.json").is_file()]
        ref = executor.submit(s, Cell("bench", present[0], gpus=bench_gpus.get(present[0], 0), cpus=cpus))
        executor.wait_all([ref], note)
        refs = [executor.submit(s, Cell("bench", n, gpus=bench_gpus.get(n, 0), cpus=cpus)) for n in present[1:]]
        executor.wait_all(refs, note)
        failed = [k for k, r in results.items() if k.startswith("bench:") and r.get("status") == "failed"]
        return EXIT_PARTIAL if failed else EXIT_OK

    run_dir = ctx.run_dir
    code = run_stages({"quantize + first eval cells": first_cells, "eval rounds + merge": more_rounds,
                       "bench cells": benches},
                      lambda: run_gate(run_dir, policy_path=req.policy, require=req.require, junit=None),
                      run_dir / "timings.json",
                      after={"report": lambda: run_report(run_dir),
                             "deploy": lambda: run_deploy(run_dir, every=req.deploy_all)})
    print(f"report: {run_dir / 'report.html'}  verdict: {run_dir / 'verdict.json'}  exit: {code}")
    return code


def _gpus(ctx: RunContext) -> dict[str, int]:
    from evals.variants import variant_manifests

    if ctx.platform.kind != "cuda":
        return {}
    return {m.recipe: ctx.serving(m).gpus for m in variant_manifests(ctx.run_dir, None)}


def _bench_gpus(ctx: RunContext) -> dict[str, int]:
    """A variant's bench cell holds its own GPUs and the reference's when a node has room for both (the pairs
    then run side by side); otherwise its own, and the reference restarts between blocks."""
    gpus = _gpus(ctx)
    if not gpus:
        return {}
    names = list(gpus)
    ref = names[0]
    out = {ref: gpus[ref]}
    for n in names[1:]:
        both = gpus[ref] + gpus[n]
        out[n] = both if both <= ctx.platform.gpu_count else gpus[n]
    return out
