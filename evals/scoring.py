"""One variant through one engine: its cache keys, its cached task results, its server, and a scoring
session (a server up, some tasks' items scored, the server down).

A session is the unit the eval stage plans (evals.stage) and a Ray cell runs: it reads and writes only its
own variant's files, so sessions of different variants can run side by side on different nodes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals import divergence, emulation
from evals.quality import Endpoint, TaskFailure, TaskIndex, run_task, subset
from evals.serve import ServerError, VllmServer, startup_timeout
from evals.variants import checkpoint_key, vllm_version
from qgcore import provenance
from qgcore.artifacts import CheckpointManifest, TaskResult, quantization_summary
from qgcore.divergence import TopK
from qgcore.errors import ArtifactError
from qgcore.hashing import content_key
from qgcore.kernels import Support, check
from qgcore.run import RunContext
from qgcore.serving import compute_dtype, flags_of, server_environment
from qgcore.vocab import EMULATED

SEED = 0
CPU_GEN_CAP = 256  # generated tokens per request on CPU (recorded, the same for every variant); GPU: none


def config_mismatch(checkpoint: Path, manifest: CheckpointManifest) -> str | None:
    """Why the checkpoint's config.json no longer says what the manifest recorded (None if it does): a
    checkpoint whose quantization_config lies must fail, not be served as something else."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{checkpoint / 'config.json'} unreadable: {type(err).__name__}: {err}"
    if quantization_summary(config) != manifest.quantization:
        return (f"{checkpoint / 'config.json'}: quantization_config disagrees with the manifest "
                f"(manifest {manifest.quantization}; config {quantization_summary(config)})")
    return None


@dataclass(frozen=True)
class TaskSpec:
    """What scoring one task needs, resolved once per stage: its hash, limit, whether it generates, and, for
    a group-sequential task, the recorded item order and look sizes."""

    name: str
    task_hash: str
    source: str | None
    limit: int | None
    generative: bool = False
    skip: str | None = None  # dataset unreachable and not cached: skipped with this reason
    # the sequential *settings* (min items, looks, seed): part of the cache key, known before any data is
    # loaded; whether the task turned out sequential (enough items) and its order are in its result
    settings: dict[str, Any] | None = None
    order: tuple[str, ...] = ()  # sequential only: every item id, in the seeded order fixed in advance
    looks: tuple[int, ...] = ()  # sequential only: cumulative items per look
    order_seed: int = 0

    @property
    def sequential(self) -> bool:
        return bool(self.looks)

    def look_items(self, j: int) -> list[str]:
        start = self.looks[j - 1] if j else 0
        return list(self.order[start:self.looks[j]])

    def design(self) -> dict[str, Any]:
        return {"order_seed": self.order_seed, "looks": list(self.looks), "n": len(self.order)}

    def fixed(self) -> TaskSpec:
        """The same task at its full n (emulated scoring is never sequential)."""
        return TaskSpec(self.name, self.task_hash, self.source, self.limit, self.generative, self.skip)


class Variant:
    """A variant scored through `engine` ("vllm" or emulated): keys, caches, server."""

    def __init__(self, manifest: CheckpointManifest, ctx: RunContext, engine: str = "vllm"):
        self.manifest, self.ctx, self.engine = manifest, ctx, engine
        self.name = manifest.recipe
        self.vdir = ctx.run_dir / manifest.recipe
        self.checkpoint = self.vdir / manifest.checkpoint_dir
        self.config = ctx.serve_config(manifest, "score")
        self.env = server_environment(self.config, _base_env(), cache_root=ctx.cache_dir, pinned=ctx.pinned_env)
        sub = "eval" if engine == "vllm" else "eval-emulated"
        self.result_dir, self.samples_dir = self.vdir / sub, self.vdir / sub / "samples"

    def support(self) -> Support:
        m = self.manifest
        return check(m.quantization, m.linear_shapes, m.architecture, tp=self.config.tensor_parallel,
                     on=self.ctx.platform, kv_cache_dtype=self.config.kv_cache_dtype)

    def flags(self) -> list[str]:
        # the flags the server really gets (and the environment as it really is): part of every cache key
        if self.engine == "vllm":
            return flags_of(self.config, self.env.recorded)
        return ["hf", compute_dtype(self.ctx.platform), self.ctx.platform.kind, emulation.FP4_ROUNDING]

    def key(self, spec: TaskSpec) -> str:
        """Everything that moves this task's scores; computable without loading the task's data."""
        return content_key({"ckpt": checkpoint_key(self.manifest), "task": spec.name, "task_hash": spec.task_hash,
                            "limit": spec.limit, "seed": SEED, "engine": self.engine, "flags": self.flags(),
                            "gen_cap": self.gen_cap_key(),
                            "sequential": spec.settings,
                            "versions": provenance.versions(("lm_eval",)) | {"vllm": self.vllm_version()}})

    def vllm_version(self) -> str:
        return vllm_version(self.ctx.serve_python)

    def gen_cap(self, spec: TaskSpec) -> int | None:
        return CPU_GEN_CAP if spec.generative and self.ctx.platform.kind == "cpu" else None

    def gen_cap_key(self) -> int | None:
        return CPU_GEN_CAP if self.ctx.platform.kind == "cpu" else None

    def saved(self, spec: TaskSpec) -> TaskResult | None:
        """The task's saved result under its current key (a partial sequential one and a failure included)."""
        path = self.result_dir / f"{spec.name}.json"
        if not path.is_file():
            return None
        try:
            res = TaskResult.read(path)
        except ArtifactError:
            return None
        return res if res.key == self.key(spec) else None

    def cached(self, spec: TaskSpec) -> TaskResult | None:
        """A saved result that needs no rescoring: a failure is never reused, the next run tries again."""
        res = self.saved(spec)
        return res if res is not None and not res.status.startswith("failed:") else None

    def save(self, res: TaskResult) -> None:
        res.write(self.result_dir / f"{res.task}.json")

    def server(self) -> VllmServer:
        timeout = startup_timeout(self.manifest.bytes_on_disk, self.ctx.startup_timeout_s)
        return VllmServer(self.checkpoint, name=self.name, log_path=self.vdir / "logs" / "eval-server.log",
                          config=self.config, env=self.env, python=self.ctx.serve_python, startup_timeout=timeout)

    def endpoint(self, server: VllmServer | None, spec: TaskSpec) -> Endpoint:
        return Endpoint(server.base_url if server else None, self.name, str(self.checkpoint),
                        self.config.max_model_len, self.ctx.platform.kind, self.gen_cap(spec),
                        compute_dtype(self.ctx.platform))


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)


@dataclass
class Work:
    """What one session scores: per task, None for all of it (fixed n) or the look to score; plus
    whether this variant's divergence top-k must still be fetched."""

    variant: str
    engine: str
    tasks: dict[str, int | None] = field(default_factory=dict)
    divergence: bool = False

    def __bool__(self) -> bool:
        return bool(self.tasks) or self.divergence


@dataclass
class SessionResult:
    """What a session reports back (also across Ray, as plain data)."""

    variant: str
    status: str = "served"  # served, or the variant-level failure code
    reason: str | None = None
    log_tail: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def score_session(v: Variant, work: Work, specs: dict[str, TaskSpec], index: TaskIndex,
                  div: divergence.DivergenceSet | None, server: VllmServer | None = None,
                  keep: bool = False) -> SessionResult:
    """Start `v`'s server (unless launched early or kept from an earlier session, or transformers), score
    `work`, save each task as it finishes, fetch the divergence top-k if asked. The server is stopped after,
    unless `keep` (the caller then owns it); a failed server is stopped whatever happens."""
    started = time.perf_counter()
    out = SessionResult(v.name)
    if v.engine == "vllm":
        server = server or v.server()
        ok = False
        try:
            server.start()
            if not server.reported:  # a server kept for a later round was described by its first session
                out.server, server.reported = server.provenance() | server.startup_info(), True
            _score(v, work, specs, index, server)
            if work.divergence and div is not None:
                _fetch_divergence(v, div, server)
            ok = True
        except ServerError as err:
            out.status, out.reason, out.log_tail = err.code, str(err), err.log_tail
        finally:
            if not (keep and ok):
                server.stop()
    else:
        _score(v, work, specs, index, None)
        if work.divergence and div is not None:
            _fetch_divergence(v, div, None)
    out.seconds = round(time.perf_counter() - started, 1)
    return out


def _score(v: Variant, work: Work, specs: dict[str, TaskSpec], index: TaskIndex, server: VllmServer | None) -> None:
    for task, look in work.tasks.items():
        spec = specs[task]
        prev = v.cached(spec) if look else None
        samples = v.samples_dir / f"{task}.jsonl"
        if not look:
            samples.unlink(missing_ok=True)
        items = subset(task, spec.look_items(look)) if look is not None else None
        base = {"key": v.key(spec), "task": task, "engine": v.engine, "task_hash": spec.task_hash,
                "source": spec.source, "limit": spec.limit}
        try:
            fields = run_task(task=task, tm=index.tm, endpoint=v.endpoint(server, spec), generative=spec.generative,
                              limit=spec.limit, items=items, seed=SEED, samples_path=samples)
        except TaskFailure as err:
            if server is not None and not server.alive():
                raise server.error(f"vLLM died while scoring {task}", "failed:crash") from None
            v.save(TaskResult(status=err.code, reason=err.reason, **base))
            continue
        if server is not None and not server.alive():
            raise server.error(f"vLLM died while scoring {task}", "failed:crash")
        res = TaskResult(status="scored", **base, **fields)
        if look is not None:
            res = merge_look(prev, res, spec, look)
        v.save(res)


def merge_look(prev: TaskResult | None, new: TaskResult, spec: TaskSpec, look: int) -> TaskResult:
    """A sequential task's result after one more look: items, examples and counts accumulate; the value is
    the mean over every item scored so far (Σnum / Σden, as lm-eval's own aggregate)."""
    items = dict(prev.items if prev else {}) | new.items
    examples = dict(prev.examples if prev else {}) | new.examples
    num, den = sum(v[0] for v in items.values()), sum(v[1] for v in items.values())
    value = num / den if den else None
    stderr = (value * (1 - value) / len(items)) ** 0.5 if value is not None and new.binary and items else None
    gen = _add(prev.generation if prev else None, new.generation)
    prompts = _add(prev.prompts if prev else None, new.prompts) or {}
    seq = {**spec.design(), "order": list(spec.order), "scored_looks": look + 1}
    return new.model_copy(update={"items": items, "examples": examples, "n_items": len(items), "value": value,
                                  "stderr": stderr, "generation": gen, "prompts": prompts, "sequential": seq,
                                  "wall_seconds": round((prev.wall_seconds if prev else 0.0) + new.wall_seconds, 2)})


def _add(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Counts of two looks added (maxima kept as maxima, settings kept as they are)."""
    if not a or not b:
        return b or a
    out = dict(b)
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            out[k] = {x: v.get(x, 0) + b[k].get(x, 0) for x in {*v, *b[k]}}
        elif k.startswith("max_") and isinstance(v, (int, float)):
            out[k] = max(v, b.get(k) or 0)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("budget", "task_budget", "cap",
                                                                                     "context"):
            out[k] = v + (b.get(k) or 0)
    return out


# ---- divergence top-k: cached per variant under a content key ----

def divergence_key(v: Variant, div: divergence.DivergenceSet) -> str:
    return content_key({"ckpt": checkpoint_key(v.manifest), "docs": div.key, "k": divergence.TOP_K,
                        "engine": v.engine, "flags": v.flags(), "vllm": v.vllm_version()})


def divergence_path(v: Variant) -> Path:
    return v.result_dir / "divergence-topk.npz"


def cached_topk(v: Variant, div: divergence.DivergenceSet) -> list[TopK] | None:
    got = divergence.load(divergence_path(v), divergence_key(v, div))
    return got[0] if got else None


def _fetch_divergence(v: Variant, div: divergence.DivergenceSet, server: VllmServer | None) -> None:
    """Fetch and cache the top-k; a failure is the diagnostic's (recorded beside the cache, never the
    variant's): the stage writes divergence.json `failed:fetch` with this reason."""
    started = time.perf_counter()
    err_path = v.result_dir / "divergence-error.txt"
    err_path.unlink(missing_ok=True)
    try:
        if server is not None:
            docs = divergence.server_topk(server.url, v.name, div)
        else:
            docs = divergence.hf_topk(v.checkpoint, div, device="cuda" if v.ctx.platform.kind == "cuda" else "cpu",
                                      dtype=compute_dtype(v.ctx.platform))
    except (OSError, RuntimeError, ValueError, TimeoutError) as err:
        if server is not None and not server.alive():
            raise server.error("vLLM died while fetching divergence log-probs", "failed:crash") from None
        v.result_dir.mkdir(parents=True, exist_ok=True)
        err_path.write_text(f"{type(err).__name__}: {err}\n")
        return
    divergence.save(divergence_path(v), divergence_key(v, div), docs,
                    {"engine": v.engine, "seconds": round(time.perf_counter() - started, 2)})


def divergence_error(v: Variant) -> str | None:
    p = v.result_dir / "divergence-error.txt"
    return p.read_text().strip() if p.is_file() else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why vLLM could not load `checkpoint` (None if it could, as far as files say): a shard the index names
    is missing, a safetensors file is truncated or its header is not safetensors (safetensors' own reader
    checks the header and that the data fills the file), or there is no tokenizer (vLLM loads it from the
    checkpoint). Seconds here instead of a server start: minutes on a 70B, and a log to read."""
    from safetensors import SafetensorError, safe_open

    index = checkpoint / "model.safetensors.index.json"
    fix = "rebuild it (`make quantize` with --force for this recipe)"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            return f"{index} unreadable ({type(err).__name__}: {err}): {fix}"
        missing = [s for s in shards if not (checkpoint / s).is_file()]
        if missing:
            return (f"{checkpoint / missing[0]} is missing ({len(missing)} of {len(shards)} shards the index "
                    f"names): {fix}")
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return f"no *.safetensors weights in {checkpoint}: {fix}"
    for f in weights:
        try:
            with safe_open(str(f), framework="numpy"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{f} is damaged (safetensors: {err}): {fix}"
    if not any((checkpoint / t).is_file() for t in TOKENIZER_FILES):
        return (f"no tokenizer in {checkpoint} (none of {', '.join(TOKENIZER_FILES)}): vLLM loads the tokenizer "
                f"from the checkpoint; {fix}")
    return None


def preflight_reason(v: Variant) -> tuple[str, str] | None:
    """(code, reason) when `v` must not be served: its files are damaged, its config lies, or the platform has
    no kernel."""
    problem = checkpoint_damage(v.checkpoint) or config_mismatch(v.checkpoint, v.manifest)
    if problem:
        return "failed:checkpoint", problem
    sup = v.support()
    if not sup.ok:
        return "unsupported", f"unsupported on {v.ctx.platform.label}: {sup.reason}"
    return None


__all__ = ["EMULATED", "SEED", "SessionResult", "TaskSpec", "Variant", "Work", "cached_topk", "checkpoint_damage",
           "config_mismatch", "divergence_error", "merge_look", "preflight_reason", "score_session"]
