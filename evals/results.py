"""Versioned artifacts of the eval and bench stages (eval.json, bench.json), read by the report stage."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from quantgate.artifact import Artifact

EVAL_SCHEMA_VERSION = 1
BENCH_SCHEMA_VERSION = 1
Status = Literal["ok", "skipped", "failed", "unsupported"]


class _Artifact(Artifact):
    producer: ClassVar[str] = "`make eval` / `make bench`"


class TaskResult(_Artifact):
    """One (checkpoint, task) pair; also the resume unit: cached under `key`."""

    key: str
    task: str
    status: Status
    reason: str | None = None
    engine: str  # "vllm" or "emulated (transformers)"
    metric: str | None = None  # primary metric, lm-eval name e.g. "acc,none"
    higher_is_better: bool = True
    binary: bool = False
    value: float | None = None
    stderr: float | None = None
    metrics: dict[str, Any] = {}
    n_items: int = 0
    items: dict[str, list[float]] = {}  # doc_id -> [num, den]: per-item outcome for paired comparison
    task_hash: str | None = None
    task_version: Any = None
    num_fewshot: int | None = None
    source: str | None = None
    limit: int | None = None
    wall_seconds: float = 0.0


class EvalRun(_Artifact):
    schema_version: Literal[1] = EVAL_SCHEMA_VERSION
    kind: Literal["eval"] = "eval"
    variant: str
    status: Status  # ok if every task ran or was skipped for a stated reason
    reason: str | None = None
    engine: str
    manifest_key: str
    tasks: dict[str, TaskResult]
    comparisons: dict[str, dict[str, Any]] = {}  # task -> evals.compare.Comparison vs bf16
    comparison_engine: str | None = None  # which bf16 run the comparisons used
    server: dict[str, Any] = {}
    server_log_tail: list[str] = []
    provenance: dict[str, Any] = {}
    wall_seconds: float = 0.0


class BenchRun(_Artifact):
    schema_version: Literal[1] = BENCH_SCHEMA_VERSION
    kind: Literal["bench"] = "bench"
    variant: str
    status: Status
    reason: str | None = None
    key: str
    tool: dict[str, str]
    settings: dict[str, Any]
    levels: list[dict[str, Any]]  # one per concurrency level
    slo: dict[str, Any]
    slo_point: dict[str, Any] | None  # highest level meeting the SLO, with cost
    memory: dict[str, Any]
    server: dict[str, Any] = {}
    server_log_tail: list[str] = []
    hardware: dict[str, Any] = {}
    wall_seconds: float = 0.0
