"""`quantgate plan`: the cell schedule and an estimated wall time on N GPUs, before renting them.

Per-cell times come from a measured run (its manifest.json / eval.json / bench.json wall seconds); with
`--params` they are scaled linearly by parameter count from the measured model (a first-order estimate:
prefill/decode work grows with parameters), and divided by `--speedup` (measured hardware -> target).
Generative tasks are scaled by the *tokens they will generate* (items x tokens per item over the tokens the
measured run generated), log-likelihood tasks by items. GPUs per cell: the variant's weights over one GPU's
memory, the function the executor uses (qgcore.serving.gpus_for); the cell graph is the executor's
(quantgate.cells.cell_graph). Scheduling is greedy list scheduling over it, longest cell first, as Ray
would place them given those resource requests.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun
from qgcore.device import GPUS
from qgcore.errors import EXIT_CONFIG, EXIT_OK, ArtifactError
from qgcore.serving import gpus_for
from qgcore.vocab import REFERENCE
from quantgate.cells import cell_graph

BYTES_PER_PARAM = {REFERENCE: 2.0, "8bit": 1.0, "4bit": 0.5}  # what a variant's weights cost per parameter


@dataclass(frozen=True)
class PlannedCell:
    id: str
    seconds: float
    gpus: int
    needs: tuple[str, ...]


@dataclass(frozen=True)
class Slot:
    id: str
    start: float
    end: float
    gpus: int


def schedule(cells: list[PlannedCell], gpus: int) -> list[Slot]:
    """Greedy list scheduling: whenever GPUs free up, start the longest ready cells that fit."""
    too_big = [c.id for c in cells if c.gpus > gpus]
    if too_big:
        raise ValueError(f"cells need more GPUs than the cluster has ({gpus}): {', '.join(too_big)}")
    done: dict[str, float] = {}
    running: list[Slot] = []
    out: list[Slot] = []
    waiting = sorted(cells, key=lambda c: -c.seconds)
    now, free = 0.0, gpus
    while waiting or running:
        started = True
        while started:
            started = False
            for c in waiting:
                if all(n in done for n in c.needs) and c.gpus <= free:
                    slot = Slot(c.id, now, now + c.seconds, c.gpus)
                    running.append(slot)
                    out.append(slot)
                    free -= c.gpus
                    waiting.remove(c)
                    started = True
                    break
        if not running:
            raise ValueError(f"cells can never start: {[c.id for c in waiting]}")
        first = min(running, key=lambda s: s.end)
        running.remove(first)
        now, free = first.end, free + first.gpus
        done[first.id] = first.end
    return out


@dataclass(frozen=True)
class Measured:
    names: list[str]  # the reference first
    family: dict[str, str]
    params: float | None  # the measured model's parameters (the reference's bytes / 2)
    quantize: dict[str, float]
    startup: dict[str, float]  # vLLM start-up per eval/bench cell (does not scale with FLOPs)
    loglik: dict[str, float]  # eval seconds on log-likelihood tasks (scale with items)
    generative: dict[str, tuple[float, int, int]]  # eval seconds, items, generated tokens on generative tasks
    other: dict[str, float]  # divergence and the rest of an eval cell
    bench: dict[str, float]


def measure(run_dir: Path) -> Measured:
    """Per-cell times from a finished run's artifacts."""
    mans = {p.parent.name: CheckpointManifest.read(p) for p in sorted(run_dir.glob("*/manifest.json"))}
    refs = [n for n, m in mans.items() if m.family == REFERENCE]
    if not refs:
        raise ArtifactError(f"{run_dir} has no reference manifest: plan from a finished run (make all)")
    names = [refs[0], *sorted(n for n in mans if n != refs[0])]
    out = Measured(names, {n: m.family for n, m in mans.items()}, mans[refs[0]].bytes_on_disk / 2, {}, {}, {}, {}, {},
                   {})
    for n in names:
        out.quantize[n] = mans[n].wall_seconds
        vdir = run_dir / n
        ev = EvalRun.read_optional(vdir / "eval.json")
        if ev is not None:
            sessions = ev.provenance.get("sessions") or []
            up = sum(float(s.get("startup_seconds") or 0.0) for s in sessions)
            out.startup[f"eval:{n}"] = up
            gen = [t for t in ev.tasks.values() if t.generation]
            out.generative[n] = (sum(t.wall_seconds for t in gen), sum(t.n_items for t in gen),
                                 sum(int(t.generation.get("completion_tokens") or 0) for t in gen if t.generation))
            out.loglik[n] = sum(t.wall_seconds for t in ev.tasks.values() if not t.generation)
            out.other[n] = max(ev.wall_seconds - up - out.loglik[n] - out.generative[n][0], 0.0)
        b = BenchRun.read_optional(vdir / "bench.json")
        if b is not None:
            out.bench[n] = b.wall_seconds
            out.startup[f"bench:{n}"] = float(b.server.get("startup_seconds") or 0.0)
    return out


def build_plan(run_dir: Path, *, gpus: int, gpu_type: str, params: float | None, speedup: float,
               items_scale: float = 1.0, gen_tokens_per_item: float | None = None,
               startup_seconds: float | None = None) -> dict[str, Any]:
    """`items_scale` multiplies every eval task's items; `gen_tokens_per_item` is what a generative item will
    generate on the target (default: what the measured run generated per item); `startup_seconds` replaces
    each served cell's measured vLLM start-up (a large model's load and warm-up do not scale with FLOPs)."""
    m = measure(run_dir)
    target = params or m.params or 0.0
    scale = (target / m.params if m.params else 1.0) / speedup
    gib = GPUS[gpu_type].memory_gib * 2**30
    per_variant = {n: gpus_for(target * BYTES_PER_PARAM.get(m.family[n], 2.0), gib) for n in m.names}  # type: ignore[call-overload]

    def up(cell: str) -> float:
        return startup_seconds if startup_seconds is not None else m.startup.get(cell, 0.0) * scale

    def eval_seconds(n: str) -> float:
        gen_s, items, tokens = m.generative.get(n, (0.0, 0, 0))
        if gen_s and tokens:
            per_item = gen_tokens_per_item if gen_tokens_per_item is not None else tokens / max(items, 1)
            gen_s = gen_s * scale * (items * items_scale * per_item) / tokens
        return up(f"eval:{n}") + m.loglik.get(n, 0.0) * scale * items_scale + gen_s + m.other.get(n, 0.0) * scale

    seconds = {f"quantize:{n}": m.quantize.get(n, 0.0) * scale for n in m.names}
    seconds |= {f"eval:{n}:0": eval_seconds(n) for n in m.names}
    seconds |= {f"bench:{n}": max(m.bench.get(n, 0.0) - m.startup.get(f"bench:{n}", 0.0), 0.0) * scale
                + up(f"bench:{n}") for n in m.names}
    ref = m.names[0]
    bench_gpus = {n: per_variant[n] + (per_variant[ref] if n != ref and per_variant[n] + per_variant[ref] <= gpus
                                       else 0) for n in m.names}
    graph = cell_graph(m.names, per_variant, bench_gpus=bench_gpus)
    cells = [PlannedCell(c.id, seconds.get(c.id, 0.0), c.gpus, c.needs) for c in graph]
    slots = schedule(cells, gpus)
    return {"run": str(run_dir), "gpus": gpus, "gpu_type": gpu_type, "params": target, "measured_params": m.params,
            "scale": scale, "sequential_seconds": sum(c.seconds for c in cells),
            "wall_seconds": max(s.end for s in slots), "cells": [s.__dict__ for s in slots],
            "gpus_per_variant": per_variant}


def add_args(p: argparse.ArgumentParser) -> None:
    from qgcore.paths import DEFAULT_SLUG

    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-type", default="H100", choices=sorted(GPUS))
    p.add_argument("--from", dest="run", type=Path, default=Path("runs") / DEFAULT_SLUG,
                   help="a finished run folder whose measured cell times to use")
    p.add_argument("--params", type=float, default=None, help="parameters of the model to plan for (e.g. 70e9)")
    p.add_argument("--speedup", type=float, default=1.0, help="target hardware / measured hardware speed (>0)")
    p.add_argument("--items-scale", type=float, default=1.0,
                   help="eval items x this (e.g. 120: MMLU-Pro's 12,032 items where the measured run scored 100)")
    p.add_argument("--gen-tokens-per-item", type=float, default=None,
                   help="tokens a generative item generates on the target (MMLU-Pro CoT: ~300-800; default: as "
                        "measured, which a CPU cap makes an underestimate)")
    p.add_argument("--startup-seconds", type=float, default=None,
                   help="vLLM start-up per eval/bench cell on the target (default: the measured one, scaled)")


def run_plan(a: argparse.Namespace) -> int:
    if a.gpus < 1 or a.speedup <= 0:
        print("quantgate plan: error: --gpus must be >= 1 and --speedup > 0", file=sys.stderr)
        return EXIT_CONFIG
    try:
        plan = build_plan(a.run, gpus=a.gpus, gpu_type=a.gpu_type, params=a.params, speedup=a.speedup,
                          items_scale=a.items_scale, gen_tokens_per_item=a.gen_tokens_per_item,
                          startup_seconds=a.startup_seconds)
    except ValueError as err:
        print(f"quantgate plan: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"plan: {a.gpus} x {a.gpu_type}, model {plan['params'] / 1e9:.3g}B params; cell times from {a.run} "
          f"x {plan['scale']:.3g}; GPUs per variant {plan['gpus_per_variant']}")
    for s in sorted(plan["cells"], key=lambda s: (s["start"], s["id"])):
        print(f"  {s['start'] / 60:8.1f} -> {s['end'] / 60:8.1f} min  {s['gpus']:>2} GPU  {s['id']}")
    print(f"estimated wall time {plan['wall_seconds'] / 3600:.2f} h (one after another: "
          f"{plan['sequential_seconds'] / 3600:.2f} h)")
    return EXIT_OK
