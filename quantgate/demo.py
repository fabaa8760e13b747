"""What `make demo` changes to fit a first run on a small machine: one home, used by the local and the Ray
executor alike, and recorded in run.json (the report's banner), so a smaller demo never passes for a full run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_LIMIT = 100  # items per task where a task names no demo size: the gate's minimum for a binary task
DEMO_DIVERGENCE_DOCS = 3  # documents for divergence (the stage default is 24): 3 still gives a CI over documents
# calibrated recipes: samples x tokens (the recipes say 64 x 512) and AWQ's scale-search grid (llmcompressor: 20)
DEMO_SIZING = {"num_samples": 32, "seq_len": 256, "grid_points": 10}
DEMO_WHY = ("demo sizing for a first run on a small machine: tasks {tasks}; calibration {num_samples} samples x "
            "{seq_len} tokens (the recipes say 64 x 512) and AWQ's scale search on {grid_points} grid points (20 by "
            "default), so the AWQ/GPTQ/NVFP4/FP8-KV checkpoints differ from a full run's; divergence from the "
            "reference on {docs} documents (24 by default); bench {bench}. `make all` runs the recipes as written, "
            "every item, the full bench.")


@dataclass(frozen=True)
class Demo:
    tasks: list[str]
    task_limits: dict[str, int | None]
    limit: int
    divergence_docs: int
    bench_config: Path | None

    def record(self) -> dict[str, Any]:
        bench = self.bench_config.name if self.bench_config else "GPU defaults"
        tasks = ", ".join(f"{t} ({self.task_limits.get(t) or self.limit} items)" for t in self.tasks)
        return {"tasks": self.tasks, "task_limits": self.task_limits, "limit": self.limit, "bench_config": bench,
                "quantize_sizing": DEMO_SIZING, "divergence_docs": self.divergence_docs,
                "note": DEMO_WHY.format(tasks=tasks, bench=bench, docs=self.divergence_docs, **DEMO_SIZING)}


def demo_settings(*, tasks: list[str] | None, limit: int | None, divergence_docs: int | None,
                  bench_config: Path | None, cpu: bool) -> Demo:
    """Fill what the user left open with the demo's sizing (the built-in tasks say their own demo sizes)."""
    from evals.bench_stage import DEMO_CPU_CONFIG
    from evals.tasks import demo_tasks

    suite = demo_tasks()
    chosen = tasks or list(suite)
    return Demo(chosen, {t: suite.get(t) for t in chosen if suite.get(t) is not None and limit is None},
                limit if limit is not None else DEMO_LIMIT,
                DEMO_DIVERGENCE_DOCS if divergence_docs is None else divergence_docs,
                bench_config if bench_config is not None or not cpu else DEMO_CPU_CONFIG)
