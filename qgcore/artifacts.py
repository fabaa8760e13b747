"""Every stage's versioned JSON artifact (run.json, manifest.json, eval.json, <task>.json, divergence.json,
bench.json): strict schemas, written atomically, read with a one-line error naming the stage to rerun.

One home for the schemas: a stage writes its own and reads the others' only through these classes, so no
stage imports another stage's code. Statuses are codes from qgcore.vocab; `reason` is for people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qgcore.errors import ArtifactError
from qgcore.vocab import DiagnosticStatus, Family, TaskStatus, VariantStatus

MANIFEST_SCHEMA_VERSION: Literal[3] = 3  # 3: linear shapes + model config (kernel preflight, KV bytes), sizing
EVAL_SCHEMA_VERSION: Literal[3] = 3  # 3: status codes, platform, kernels, generation/prompt counts, sequential
BENCH_SCHEMA_VERSION: Literal[2] = 2  # 2: status codes, capacity sweep, GPUs, memory need
DIVERGENCE_SCHEMA_VERSION: Literal[2] = 2  # 2: status codes, document length vs served context
RUN_SCHEMA_VERSION: Literal[1] = 1


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # what to run when the file is missing or invalid, for the error message
    producer: ClassVar[str] = "the stage that writes it"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.model_dump_json(indent=1) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def read(cls, path: Path) -> Self:
        if not path.is_file():
            raise ArtifactError(f"missing {path}: run {cls.producer} first")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (ValidationError, json.JSONDecodeError) as err:
            raise ArtifactError(f"invalid {path}: {str(err).splitlines()[0]}; rerun {cls.producer}") from None

    @classmethod
    def read_optional(cls, path: Path) -> Self | None:
        return cls.read(path) if path.is_file() else None


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


_MODEL_KEYS = ("max_position_embeddings", "num_attention_heads", "num_key_value_heads", "hidden_size",
               "num_hidden_layers", "head_dim", "intermediate_size", "vocab_size")


def model_config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture facts serving depends on (context, heads for tensor parallel, KV bytes per token)."""
    text = config.get("text_config") or {}
    out = {k: config.get(k, text.get(k)) for k in _MODEL_KEYS}
    hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
    if out.get("head_dim") is None and hidden and heads:
        out["head_dim"] = int(hidden) // int(heads)
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out.get("num_attention_heads")
    return out


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    path: str
    revision: str
    slug: str
    source: str


class RunRecord(Artifact):
    """runs/<slug>/run.json: the facts of a run every later stage and the gate need, resolved once.

    `declared` is the recipe set the run was asked to measure (the union over every quantize call): the
    gate's family-wise correction counts it, never the folders that happen to be present."""

    producer: ClassVar[str] = "`make quantize`"
    schema_version: Literal[1] = RUN_SCHEMA_VERSION
    kind: Literal["run"] = "run"
    model: ModelRef
    reference: str
    declared: list[str]  # reference first
    families: dict[str, Family]
    target: dict[str, Any]  # the platform a verdict is scoped to: {"kind", "gpu", "compute_capability", "source"}
    serving: dict[str, dict[str, Any]] = {}  # variant -> {tensor_parallel, gpus, max_model_len, sources}
    updated_at: str


class CheckpointManifest(Artifact):
    producer: ClassVar[str] = "`make quantize`"
    schema_version: Literal[3] = MANIFEST_SCHEMA_VERSION
    kind: Literal["checkpoint"] = "checkpoint"
    content_key: str  # hash of model revision + recipe hash + calibration + versions: a rerun with it skips
    model: ModelRef
    recipe: str
    family: Family
    recipe_hash: str
    recipe_spec: dict[str, Any]
    calibration: dict[str, Any] | None
    calibration_data: str | None  # provenance id with content hash
    sizing: dict[str, Any] | None = None  # quantize.recipe.Sizing when a smaller (demo) calibration was used
    versions: dict[str, str]
    device: dict[str, Any]
    wall_seconds: float
    peak_memory: dict[str, Any]  # {"rss_bytes": ..., "cuda_bytes": ...}, labelled by kind
    bytes_on_disk: int
    checkpoint_dir: str  # relative to the manifest's folder
    files: dict[str, dict[str, Any]]  # checkpoint file -> {bytes, mtime_ns, sha256}: verified by every later stage
    quantization: dict[str, Any]  # summary of config.json's quantization_config (unquantized for the reference)
    linear_shapes: dict[str, list[int]]  # Linear kind (q_proj, down_proj, ...) -> [in_features, out_features]
    architecture: dict[str, Any]  # model_config_summary of config.json: context, heads, KV shape
    serve: dict[str, Any]  # the recipe's serving spec, for the eval stage
    created_at: str


class _Measured(Artifact):
    producer: ClassVar[str] = "`make eval` / `make bench`"


class TaskResult(_Measured):
    """One (checkpoint, task) pair; also the resume unit: cached under `key` (a sequential task grows look
    by look under the same key)."""

    key: str
    task: str
    status: TaskStatus
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
    # doc_id -> {"question", "target", "choice", "margin"}: what the model chose under the *scored* metric
    examples: dict[str, dict[str, Any]] = {}
    # log-likelihood requests whose context was left-truncated to the served context (should be 0)
    prompts: dict[str, Any] = {}
    # generative tasks: requests, budget (max_gen_toks) and any CPU cap, and how each generation ended
    generation: dict[str, Any] | None = None
    # group-sequential tasks: the recorded order, looks, how many were scored and why scoring stopped
    sequential: dict[str, Any] | None = None
    wall_seconds: float = 0.0


class EvalRun(_Measured):
    schema_version: Literal[3] = EVAL_SCHEMA_VERSION
    kind: Literal["eval"] = "eval"
    variant: str
    family: Family
    status: VariantStatus
    reason: str | None = None
    engine: str
    platform: dict[str, Any]  # where it was served: {"kind", "gpu", "compute_capability", "label"}
    vllm_status: VariantStatus | None = None  # for an emulated run: what vLLM said (unsupported)
    manifest_key: str
    tasks: dict[str, TaskResult]
    server: dict[str, Any] = {}
    kernels: dict[str, Any] = {}  # what vLLM chose (qgcore.kernels.read_log) and what the preflight expected
    server_log_tail: list[str] = []
    provenance: dict[str, Any] = {}
    wall_seconds: float = 0.0


class BenchRun(_Measured):
    schema_version: Literal[2] = BENCH_SCHEMA_VERSION
    kind: Literal["bench"] = "bench"
    variant: str
    status: VariantStatus
    reason: str | None = None
    key: str
    tool: dict[str, str]
    settings: dict[str, Any]
    levels: list[dict[str, Any]]  # one per load level run
    slo: dict[str, Any]
    capacity: dict[str, Any] | None = None  # the sweep's capacity at the SLO with intervals (evals.perf)
    throughput_vs_reference: dict[str, Any] | None = None  # ratio at capacity from interleaved pairs
    workloads: dict[str, Any] = {}  # per workload (random, prefix-heavy): its levels and capacity
    memory: dict[str, Any]
    server: dict[str, Any] = {}
    server_log_tail: list[str] = []
    hardware: dict[str, Any] = {}
    prometheus: dict[str, Any] = {}  # PromQL series recorded by the bench's own Prometheus
    wall_seconds: float = 0.0


class DivergenceRun(_Measured):
    """Token-level divergence of a variant from the reference on the same documents (qgcore.divergence):
    diagnostic unless the policy sets a cap. Written by the eval stage, next to eval.json."""

    schema_version: Literal[2] = DIVERGENCE_SCHEMA_VERSION
    kind: Literal["divergence"] = "divergence"
    variant: str
    status: DiagnosticStatus
    reason: str | None = None
    engine: str  # how the variant's log-probs were produced: "vllm" or "emulated (transformers)"
    reference_engine: str  # how the reference's were (the same engine: a comparison never mixes engines)
    key: str
    k: int  # top-k log-probs per position
    method: str
    source: str  # the documents' provenance id
    n_docs: int = 0
    doc_tokens: int = 0  # tokens per document (the deepest position measured)
    max_model_len: int = 0  # the served context
    overall: dict[str, Any] = {}  # n_tokens, kl_mean/median/p90/p99, top1_agreement, p_ref_top_mean, kl_mean_ci
    by_depth: list[dict[str, Any]] = []  # the same per position bucket (depth_from, depth_to]
    doc_kl_mean: list[float] = []


class Timings(Artifact):
    """runs/<slug>/timings.json: wall seconds per stage of the last `quantgate all`."""

    producer: ClassVar[str] = "`quantgate all`"
    stages_seconds: dict[str, float] = Field(default_factory=dict)
    exit_codes: dict[str, int] = Field(default_factory=dict)
