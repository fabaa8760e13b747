"""`quantgate plan`: the cell schedule and an estimated wall time on N GPUs, before renting them.

Per-cell times come from a measured run (its manifest.json / eval.json / bench.json wall seconds); with
`--params` they are scaled linearly by parameter count from the measured model (a first-order estimate:
prefill/decode work grows with parameters), and divided by `--speedup` (measured hardware -> target).
GPUs per cell: the variant's weights (bytes per parameter by family, +30% for activations and the KV cache)
over one GPU's memory, rounded up to a power of two (tensor parallel); quantize cells take one GPU
(llmcompressor onloads layer by layer). Scheduling is greedy list scheduling over the cell graph, longest
cell first, as Ray would place them given those resource requests.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPU_MEMORY_GIB = {"H100": 80, "H200": 141, "B200": 192, "A100": 80, "L40S": 48, "L4": 24}
BYTES_PER_PARAM = {"bf16": 2.0, "8bit": 1.0, "4bit": 0.5}
HEADROOM = 1.3


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


def gpus_for(params: float, family: str, gpu_gib: float) -> int:
    need = params * BYTES_PER_PARAM.get(family, 2.0) * HEADROOM / (gpu_gib * 2**30)
    return 1 if need <= 1 else 2 ** math.ceil(math.log2(need))


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


def measured_cells(run_dir: Path) -> tuple[dict[str, float], dict[str, str], float | None, dict[str, float]]:
    """Per-cell seconds from a run's artifacts, each variant's family, the measured model's parameters, and
    the vLLM start-up part of each eval/bench cell."""
    secs: dict[str, float] = {}
    startup: dict[str, float] = {}
    family: dict[str, str] = {}
    params = None
    for man in sorted(run_dir.glob("*/manifest.json")):
        name = man.parent.name
        m = json.loads(man.read_text())
        family[name] = "bf16" if name == "bf16" else m["recipe_spec"].get("family", "bf16")
        secs[f"quantize:{name}"] = float(m.get("wall_seconds") or 0.0)
        if name == "bf16":
            params = m.get("bytes_on_disk", 0) / 2  # bf16: two bytes a parameter
        for kind, fname in (("eval", "eval.json"), ("bench", "bench.json")):
            p = man.parent / fname
            if p.is_file():
                art = json.loads(p.read_text())
                server = art.get("server") or {}
                waited = float(server.get("startup_seconds") or 0.0)
                # a server launched while the previous variant scored: a cell on its own waits for all of it
                full = float(server.get("launch_to_ready_seconds") or waited)
                secs[f"{kind}:{name}"] = float(art.get("wall_seconds") or 0.0) + full - waited
                startup[f"{kind}:{name}"] = full
    return secs, family, params, startup


def build_plan(run_dir: Path, *, gpus: int, gpu_type: str, params: float | None, speedup: float,
               items_scale: float = 1.0, startup_seconds: float | None = None) -> dict[str, Any]:
    """`items_scale` multiplies eval work (more items than the measured run); `startup_seconds` replaces each
    eval/bench cell's measured vLLM start-up (a large model's load and warm-up do not scale with FLOPs)."""
    secs, family, measured, startup = measured_cells(run_dir)
    if "quantize:bf16" not in secs:
        raise ValueError(f"{run_dir} has no bf16/manifest.json: plan from a finished run (make all)")
    target = params or measured or 0.0
    scale = (target / measured if measured else 1.0) / speedup
    gib = GPU_MEMORY_GIB[gpu_type]
    names = ["bf16", *sorted(n for n in family if n != "bf16")]

    def served(cell: str, work_scale: float) -> float:
        up = startup.get(cell, 0.0)
        work = max(secs.get(cell, 0.0) - up, 0.0) * scale * work_scale
        return work + (startup_seconds if startup_seconds is not None else up * scale)

    cells = []
    for n in names:
        tp = gpus_for(target, family[n], gib)
        cells.append(PlannedCell(f"quantize:{n}", secs.get(f"quantize:{n}", 0.0) * scale, 1, ()))
        cells.append(PlannedCell(f"eval:{n}", served(f"eval:{n}", items_scale), tp,
                                 (f"quantize:{n}",) + (() if n == "bf16" else ("eval:bf16",))))
    evals = tuple(f"eval:{n}" for n in names)
    cells += [PlannedCell(f"bench:{n}", served(f"bench:{n}", 1.0), gpus_for(target, family[n], gib), evals)
              for n in names]
    slots = schedule(cells, gpus)
    return {"run": str(run_dir), "gpus": gpus, "gpu_type": gpu_type, "params": target, "measured_params": measured,
            "scale": scale, "sequential_seconds": sum(c.seconds for c in cells),
            "wall_seconds": max(s.end for s in slots), "cells": [s.__dict__ for s in slots]}


def add_args(p: argparse.ArgumentParser) -> None:
    from qgcore.paths import DEFAULT_SLUG

    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-type", default="H100", choices=sorted(GPU_MEMORY_GIB))
    p.add_argument("--from", dest="run", type=Path, default=Path("runs") / DEFAULT_SLUG,
                   help="a finished run folder whose measured cell times to use")
    p.add_argument("--params", type=float, default=None, help="parameters of the model to plan for (e.g. 70e9)")
    p.add_argument("--speedup", type=float, default=1.0, help="target hardware / measured hardware speed (>0)")
    p.add_argument("--items-scale", type=float, default=1.0,
                   help="eval work x this (e.g. 120: MMLU-Pro's 12,032 items where the measured run scored 100)")
    p.add_argument("--startup-seconds", type=float, default=None,
                   help="vLLM start-up per eval/bench cell on the target (default: the measured one, scaled)")


def run_plan(a: argparse.Namespace) -> int:
    from qgcore.errors import EXIT_CONFIG, EXIT_OK

    if a.gpus < 1 or a.speedup <= 0:
        print("quantgate plan: error: --gpus must be >= 1 and --speedup > 0")
        return EXIT_CONFIG
    try:
        plan = build_plan(a.run, gpus=a.gpus, gpu_type=a.gpu_type, params=a.params, speedup=a.speedup,
                          items_scale=a.items_scale, startup_seconds=a.startup_seconds)
    except (ValueError, OSError) as err:
        print(f"quantgate plan: error: {err}")
        return EXIT_CONFIG
    print(f"plan: {a.gpus} x {a.gpu_type}, model {plan['params'] / 1e9:.3g}B params; cell times from {a.run} "
          f"x {plan['scale']:.3g}")
    for s in sorted(plan["cells"], key=lambda s: (s["start"], s["id"])):
        print(f"  {s['start'] / 60:8.1f} -> {s['end'] / 60:8.1f} min  {s['gpus']:>2} GPU  {s['id']}")
    print(f"estimated wall time {plan['wall_seconds'] / 3600:.2f} h (one after another: "
          f"{plan['sequential_seconds'] / 3600:.2f} h)")
    return EXIT_OK
