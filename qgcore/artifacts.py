"""Every stage's versioned JSON artifact (manifest.json, eval.json, <task>.json, divergence.json, bench.json).

One home for the schemas: a stage writes its own and reads the others' only through these classes, so
no stage imports another stage's code.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from qgcore.artifact import Artifact

MANIFEST_SCHEMA_VERSION: Literal[2] = 2  # 2: per-file hashes
EVAL_SCHEMA_VERSION: Literal[2] = 2  # 2: chance rate, scored-metric examples, Tango/BCa comparisons
BENCH_SCHEMA_VERSION: Literal[1] = 1
DIVERGENCE_SCHEMA_VERSION: Literal[1] = 1
Status = Literal["ok", "skipped", "failed", "unsupported"]


def quantization_summary(config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's config.json says it is: recorded in the manifest, re-read before serving."""
    q = config.get("quantization_config")
    if not q:
        return {"quantized": False, "dtype": str(config.get("torch_dtype") or config.get("dtype"))}
    group: dict[str, Any] = next(iter((q.get("config_groups") or {}).values()), {})
    return {
        "quantized": True,
        "quant_method": q.get("quant_method"),
        "format": q.get("format"),
        "weights": group.get("weights"),
        "input_activations": group.get("input_activations"),
        "kv_cache_scheme": q.get("kv_cache_scheme"),
        "ignore": q.get("ignore"),
    }


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    path: str
    revision: str
    slug: str
    source: str


class CheckpointManifest(Artifact):
    producer: ClassVar[str] = "`make quantize`"
    schema_version: Literal[2] = MANIFEST_SCHEMA_VERSION
    kind: Literal["checkpoint"] = "checkpoint"
    content_key: str  # hash of model revision + recipe hash + calibration + versions: a rerun with it skips
    model: ModelRef
    recipe: str
    recipe_hash: str
    recipe_spec: dict[str, Any]
    calibration: dict[str, Any] | None
    calibration_data: str | None  # provenance id with content hash
    versions: dict[str, str]
    device: dict[str, Any]
    wall_seconds: float
    peak_memory: dict[str, Any]  # {"rss_bytes": ..., "cuda_bytes": ...}, labelled by kind
    bytes_on_disk: int
    checkpoint_dir: str  # relative to the manifest's folder
    files: dict[str, dict[str, Any]]  # checkpoint file -> {bytes, mtime_ns, sha256}: verified by every later stage
    quantization: dict[str, Any]  # summary of config.json's quantization_config (None for bf16)
    serve: dict[str, Any]  # the recipe's serving spec, for the eval stage
    created_at: str


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
    chance: float | None = None  # chance accuracy (mean 1/choices) of a multiple-choice task, else None
    # doc_id -> {"question", "target", "choice"}: what the model chose under the *scored* metric (acc_norm
    # where that is the metric) and bf16's margin between its top two choices; the report's flip evidence
    examples: dict[str, dict[str, Any]] = {}
    wall_seconds: float = 0.0


class EvalRun(_Artifact):
    schema_version: Literal[2] = EVAL_SCHEMA_VERSION
    kind: Literal["eval"] = "eval"
    variant: str
    status: Status  # ok if every task ran or was skipped for a stated reason
    reason: str | None = None
    engine: str
    manifest_key: str
    tasks: dict[str, TaskResult]
    comparisons: dict[str, dict[str, Any]] = {}  # task -> qgcore.stats.Comparison vs bf16 at 95% (display)
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


class DivergenceRun(_Artifact):
    """Token-level divergence of a variant from bf16 on the same documents (qgcore.divergence): diagnostic
    unless the policy sets a cap. Written by the eval stage, next to eval.json."""

    schema_version: Literal[1] = DIVERGENCE_SCHEMA_VERSION
    kind: Literal["divergence"] = "divergence"
    variant: str
    status: Status
    reason: str | None = None
    engine: str  # how the variant's log-probs were produced: "vllm" or "emulated (transformers)"
    reference_engine: str  # how bf16's were (the same engine: a comparison never mixes engines)
    key: str
    k: int  # top-k log-probs per position
    method: str
    source: str  # the documents' provenance id
    n_docs: int = 0
    max_model_len: int = 0
    overall: dict[str, Any] = {}  # n_tokens, kl_mean/median/p90/p99, top1_agreement, p_ref_top_mean, kl_mean_ci
    by_depth: list[dict[str, Any]] = []  # the same per position bucket (depth_from, depth_to]
    doc_kl_mean: list[float] = []
