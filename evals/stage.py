"""The eval stage: for bf16 and each checkpoint, one vLLM server scores every task; then paired
comparisons against bf16 on identical items are written into each variant's eval.json.

Resumable per (checkpoint, task): each finished pair is saved under `<variant>/eval/<task>.json` with
a content key (checkpoint key, task hash, limit, seed, lm-eval/vLLM versions, server flags) and reused
when the key matches, so bf16 is scored once and a rerun after Ctrl-C redoes only unfinished pairs.
A server that will not start or dies marks that variant failed (with vLLM's last log lines); the
other variants still run and the exit code is 9.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals import divergence, emulation
from evals.quality import check_tasks, model_args_for_hf, model_args_for_server, run_task, task_manager
from evals.serve import ServerError, VllmServer, on_cuda
from evals.tasks import (
    BUILTIN_TASKS,
    DEFAULT_TASKS,
    build_builtin_suite,
    dataset_skip_reason,
    task_info,
    user_task_hash,
)
from evals.variants import checkpoint_key, variant_manifests, vllm_version
from qgcore import provenance
from qgcore.artifacts import CheckpointManifest, DivergenceRun, EvalRun, TaskResult, quantization_summary
from qgcore.divergence import TOPK_METHOD, TopK, summarize
from qgcore.errors import EXIT_OK, EXIT_PARTIAL, ArtifactError
from qgcore.hashing import content_key
from qgcore.paths import CACHE_DIR, slug_for
from qgcore.serving import ServeConfig
from qgcore.stats import compare_runs
from qgcore.vocab import EMULATED

SEED = 0


def pair_key(manifest: CheckpointManifest, task: str, task_hash: str, limit: int | None, engine: str,
             flags: list[str]) -> str:
    return content_key({"ckpt": checkpoint_key(manifest), "task": task, "task_hash": task_hash, "limit": limit,
                        "seed": SEED, "engine": engine, "flags": flags,
                        "versions": provenance.versions(("lm_eval",)) | {"vllm": vllm_version()}})


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


class _Plan:
    """Everything one variant needs to score its tasks with one engine."""

    def __init__(self, manifest: CheckpointManifest, run_dir: Path, engine: str):
        self.manifest, self.engine = manifest, engine
        self.vdir = run_dir / manifest.recipe
        self.checkpoint = self.vdir / manifest.checkpoint_dir
        self.cfg = ServeConfig.from_spec(manifest.serve, scoring=True)
        sub = "eval" if engine == "vllm" else "eval-emulated"
        self.result_dir, self.samples_dir = self.vdir / sub, self.vdir / sub / "samples"

    def server(self) -> VllmServer:
        return VllmServer(self.checkpoint, name=self.manifest.recipe, log_path=self.vdir / "logs" / "eval-server.log",
                          config=self.cfg, scheme=self.manifest.recipe_spec["quant"]["scheme"])

    def flags(self) -> list[str]:
        # the flags the server really gets here (GPU and CPU differ), so cache keys and provenance match
        if self.engine == "vllm":  # thread settings can move the last digits of a log-prob: part of the key
            return self.cfg.args(cuda=on_cuda()) + [f"{k}={v}" for k, v in self.cfg.env(on_cuda()).items()]
        return ["hf", "bfloat16", "cuda" if on_cuda() else "cpu", emulation.FP4_ROUNDING]

    def cached(self, task: str, key: str) -> TaskResult | None:
        path = self.result_dir / f"{task}.json"
        if not path.is_file():
            return None
        try:
            res = TaskResult.read(path)
        except ArtifactError:
            return None
        return res if res.key == key and res.status in ("ok", "skipped") else None

    def save(self, res: TaskResult) -> None:
        self.result_dir.mkdir(parents=True, exist_ok=True)
        res.write(self.result_dir / f"{res.task}.json")


def _score_tasks(plan: _Plan, tasks: list[str], keys: dict[str, str], hashes: dict[str, str],
                 sources: dict[str, str], skips: dict[str, str], tm, limit: int | None,  # noqa: ANN001
                 server: VllmServer | None, generative: dict[str, bool]) -> dict[str, TaskResult]:
    out: dict[str, TaskResult] = {}
    for task in tasks:
        base = {"key": keys[task], "task": task, "engine": plan.engine, "task_hash": hashes[task],
                "source": sources.get(task), "limit": limit}
        if task in skips:
            res = TaskResult(status="skipped", reason=skips[task], **base)
        else:
            gen = generative[task]
            if server is not None:
                lm, margs = model_args_for_server(server.base_url, plan.manifest.recipe, str(plan.checkpoint), gen)
            else:
                lm, margs = model_args_for_hf(str(plan.checkpoint), cuda=on_cuda())
            try:
                fields = run_task(task=task, tm=tm, lm=lm, model_args=margs, limit=limit, seed=SEED,
                                  samples_path=plan.samples_dir / f"{task}.jsonl", generative=gen)
            except Exception as err:
                if server is not None and not server.alive():
                    raise server._error(f"vLLM died while scoring {task}") from None
                raise RuntimeError(f"lm-eval failed on {task}: {type(err).__name__}: {err}") from None
            res = TaskResult(status="ok", **base, **fields)
        plan.save(res)
        out[task] = res
    return out


class _Divergence:
    """This stage's divergence documents and where each variant's top-k log-probs are cached."""

    def __init__(self, dset: divergence.DivergenceSet, max_model_len: int):
        self.dset, self.max_model_len = dset, max_model_len

    def key(self, plan: _Plan) -> str:
        return content_key({"ckpt": checkpoint_key(plan.manifest), "docs": self.dset.key, "k": divergence.TOP_K,
                            "engine": plan.engine, "flags": plan.flags(), "vllm": vllm_version()})

    def path(self, plan: _Plan) -> Path:
        return plan.result_dir / "divergence-topk.npz"

    def cached(self, plan: _Plan) -> list[TopK] | None:
        got = divergence.load(self.path(plan), self.key(plan))
        return got[0] if got else None

    def fetch(self, plan: _Plan, server: VllmServer | None) -> None:
        started = time.perf_counter()
        if server is not None:
            docs = divergence.server_topk(server.url, plan.manifest.recipe, self.dset)
        else:
            docs = divergence.hf_topk(plan.checkpoint, self.dset, device="cuda" if on_cuda() else "cpu")
        divergence.save(self.path(plan), self.key(plan), docs,
                        {"engine": plan.engine, "seconds": round(time.perf_counter() - started, 2)})


def _work(plan: _Plan, tasks: list[str], hashes: dict, skips: dict, limit: int | None, force: bool,
          div: _Divergence | None) -> tuple[dict[str, str], dict[str, TaskResult], list[str], bool, str | None]:
    """Cache keys, cached results, tasks still to score, whether divergence is still needed, and why the
    checkpoint cannot be scored at all (a config that disagrees with its manifest)."""
    keys = {t: pair_key(plan.manifest, t, hashes[t], limit, plan.engine, plan.flags()) for t in tasks}
    done = {} if force else {t: r for t in tasks if (r := plan.cached(t, keys[t])) is not None}
    pending = [t for t in tasks if t not in done]
    need_div = div is not None and (force or div.cached(plan) is None)
    mismatch = config_mismatch(plan.checkpoint, plan.manifest) if pending or need_div else None
    if mismatch:
        return keys, done, [], False, mismatch
    return keys, done, [t for t in pending if t not in skips], need_div, None


def _eval_variant(plan: _Plan, tasks: list[str], hashes: dict, sources: dict, skips: dict, tm,  # noqa: ANN001
                  limit: int | None, force: bool, generative: dict[str, bool],
                  div: _Divergence | None = None, server: VllmServer | None = None) -> EvalRun:
    """`server`: this variant's server if it was launched early (EvalContext.launch); stopped here either way."""
    started = time.perf_counter()
    keys, done, scored, need_div, mismatch = _work(plan, tasks, hashes, skips, limit, force, div)
    server_info: dict = {}
    tail: list[str] = []
    status, reason = ("failed", mismatch) if mismatch else ("ok", None)
    skipped = [t for t in tasks if t not in done and t in skips and not mismatch]
    done |= _score_tasks(plan, skipped, keys, hashes, sources, skips, tm, limit, None, generative)
    if server is not None and not ((scored or need_div) and plan.engine == "vllm"):
        server.stop()  # launched early, not needed after all
    if (scored or need_div) and plan.engine == "vllm":
        server = server or plan.server()
        try:
            with server:
                server_info = server.provenance() | server.startup_info()
                done |= _score_tasks(plan, scored, keys, hashes, sources, skips, tm, limit, server, generative)
                if need_div and div is not None:
                    div.fetch(plan, server)
        except ServerError as err:
            status = "unsupported" if err.unsupported else "failed"
            reason = f"unsupported here: {err}" if err.unsupported else str(err)
            tail = err.log_tail
        except (RuntimeError, OSError) as err:
            status, reason, tail = "failed", f"{type(err).__name__}: {err}", server.log_tail()
    elif scored or need_div:
        try:
            done |= _score_tasks(plan, scored, keys, hashes, sources, skips, tm, limit, None, generative)
            if need_div and div is not None:
                div.fetch(plan, None)
        except RuntimeError as err:
            status, reason = "failed", str(err)
    if not server_info and plan.engine == "vllm":
        server_info = _previous_server_info(plan)  # all pairs cached: keep how they were served
    return EvalRun(
        variant=plan.manifest.recipe, status=status, reason=reason, engine=plan.engine,
        manifest_key=plan.manifest.content_key, tasks={t: done[t] for t in tasks if t in done},
        server=server_info, server_log_tail=tail,
        provenance={"versions": provenance.versions(("lm_eval", "transformers", "torch")) | {"vllm": vllm_version()},
                    "hardware": provenance.hardware(), "limit": limit, "seed": SEED, "flags": plan.flags(),
                    "task_hashes": {t: hashes[t] for t in tasks}, "task_sources": sources},
        wall_seconds=round(time.perf_counter() - started, 1),
    )


def divergence_run(plan: _Plan, ref: _Plan, div: _Divergence, run: EvalRun) -> DivergenceRun:
    """The variant's top-k against bf16's through the same engine, summarised (or why there is none)."""
    base = {"variant": plan.manifest.recipe, "engine": plan.engine, "reference_engine": ref.engine,
            "key": content_key([div.key(plan), div.key(ref)]), "k": divergence.TOP_K, "method": TOPK_METHOD,
            "source": div.dset.source, "n_docs": len(div.dset.docs), "max_model_len": div.max_model_len}
    mine, theirs = div.cached(plan), div.cached(ref)
    if mine is None or theirs is None:
        who = "bf16" if theirs is None else plan.manifest.recipe
        status = run.status if run.status in ("failed", "unsupported") else "failed"
        return DivergenceRun(status=status, reason=f"no top-k log-probs for {who}: {run.reason or 'not scored'}",
                             **base)
    stats = summarize(theirs, mine, div.max_model_len)
    return DivergenceRun(status="ok", overall=stats["overall"], by_depth=stats["by_depth"],
                         doc_kl_mean=stats["doc_kl_mean"], **base)


def _previous_server_info(plan: _Plan) -> dict:
    path = plan.vdir / "eval.json"
    try:
        old = EvalRun.read(path) if path.is_file() else None
    except ArtifactError:
        return {}
    return old.server if old and old.manifest_key == plan.manifest.content_key and old.engine == "vllm" else {}


def add_comparisons(run: EvalRun, baseline: EvalRun) -> EvalRun:
    """95% paired comparisons for display; the gate recomputes them at its family-wise level."""
    return run.model_copy(update={"comparisons": compare_runs(run, baseline), "comparison_engine": baseline.engine})


def _write_divergence(run_dir: Path, manifests: list[CheckpointManifest], name: str, run: EvalRun,
                      div: _Divergence | None) -> None:
    path = run_dir / name / "divergence.json"
    if div is None:  # not asked for: an old file would describe other documents or another checkpoint
        path.unlink(missing_ok=True)
        return
    engine = run.engine if run.engine == EMULATED else "vllm"
    by_name = {m.recipe: m for m in manifests}
    res = divergence_run(_Plan(by_name[name], run_dir, engine), _Plan(by_name["bf16"], run_dir, engine), div, run)
    res.write(path)
    o = res.overall
    if res.status == "ok":
        tqdm.write(f"quantgate: {name}: KL from bf16 mean {o['kl_mean']:.4f} p99 {o['kl_p99']:.4f}, "
                   f"top-1 agreement {o['top1_agreement']:.3f} ({o['n_tokens']} tokens, {engine})")


@dataclass
class EvalContext:
    """What scoring any variant of one run needs: tasks resolved, hashed and checked once."""

    run_dir: Path
    manifests: list[CheckpointManifest]
    tasks: list[str]
    hashes: dict[str, str]
    sources: dict[str, str]
    skips: dict[str, str]
    tm: Any
    generative: dict[str, bool]
    limit: int | None
    force: bool
    div: _Divergence | None

    def score(self, m: CheckpointManifest, engine: str = "vllm", server: VllmServer | None = None) -> EvalRun:
        """Score one variant through `engine`, filling the per-(checkpoint, task) cache; writes no eval.json."""
        return _eval_variant(_Plan(m, self.run_dir, engine), self.tasks, self.hashes, self.sources, self.skips,
                             self.tm, self.limit, self.force, self.generative, self.div, server)

    def launch(self, m: CheckpointManifest) -> VllmServer | None:
        """Launch `m`'s vLLM server now, without waiting, if scoring it will need one: on CPU the previous
        variant's scoring then overlaps this one's start-up (~30 s of mostly single-core imports). Not on a
        GPU, where each server takes most of the card's memory."""
        plan = _Plan(m, self.run_dir, "vllm")
        if on_cuda():
            return None
        _keys, _done, scored, need_div, mismatch = _work(plan, self.tasks, self.hashes, self.skips, self.limit,
                                                          self.force, self.div)
        return plan.server().launch() if (scored or need_div) and not mismatch else None


def prepare_eval(*, model: str | None, recipes: list[str] | None, runs_root: Path, tasks: list[str] | None,
                 include_path: Path | None, limit: int | None, force: bool = False, verify: bool = False,
                 divergence_docs: int | None = None, divergence_data: str | None = None,
                 quiet: bool = False) -> EvalContext:
    run_dir = runs_root / slug_for(model)
    manifests = variant_manifests(run_dir, recipes, verify=verify)
    tasks = tasks or list(DEFAULT_TASKS)
    if include_path is not None and not include_path.is_dir():
        raise ArtifactError(f"--include-path {include_path} is not a folder of lm-eval task YAMLs")
    suite = build_builtin_suite(CACHE_DIR)
    tm = task_manager([suite.include_dir] + ([include_path] if include_path else []))
    check_tasks(tasks, tm)
    hashes = {t: suite.hashes.get(t) or user_task_hash(include_path, t) for t in tasks}
    infos = {t: task_info(t, tm) for t in tasks}
    generative = {t: infos[t].output_type == "generate_until" for t in tasks}
    skips = {t: r for t in tasks if t not in BUILTIN_TASKS and (r := dataset_skip_reason(t, infos[t]))}
    for t, r in skips.items():
        if not quiet:
            tqdm.write(f"quantgate: skipping {t}: {r}")
    div = None
    if divergence_docs is None:  # one home for the default: evals.divergence
        divergence_docs = divergence.DEFAULT_DOCS
    if divergence_docs > 0:  # documents tokenized once, with bf16's tokenizer (every variant shares it)
        ref = _Plan(manifests[0], run_dir, "vllm")
        div = _Divergence(divergence.build_set(ref.checkpoint, n_docs=divergence_docs,
                                               max_model_len=ref.cfg.max_model_len, data=divergence_data),
                          ref.cfg.max_model_len)
    return EvalContext(run_dir, manifests, tasks, hashes, suite.sources, skips, tm, generative, limit, force, div)


def run_eval_stage(*, model: str | None, recipes: list[str] | None, runs_root: Path, tasks: list[str] | None,
                   include_path: Path | None, limit: int | None, emulate: bool, force: bool,
                   verify: bool = False, divergence_docs: int | None = None,
                   divergence_data: str | None = None, scored: dict[str, EvalRun] | None = None) -> int:
    """Score every variant (bf16 first) and write eval.json + divergence.json. `scored`: variants already
    scored through vLLM elsewhere (the Ray executor's cells): their results are used as they are."""
    ctx = prepare_eval(model=model, recipes=recipes, runs_root=runs_root, tasks=tasks, include_path=include_path,
                       limit=limit, force=force, verify=verify, divergence_docs=divergence_docs,
                       divergence_data=divergence_data)
    run_dir, manifests, div = ctx.run_dir, ctx.manifests, ctx.div
    runs: dict[str, EvalRun] = {}
    todo = [m for m in manifests if not (scored and m.recipe in scored)]
    live: dict[str, VllmServer | None] = {}  # launched, not yet stopped
    bar = tqdm(manifests, desc="eval", unit="variant")
    try:
        for m in bar:
            bar.set_postfix_str(m.recipe)
            if scored and m.recipe in scored:
                runs[m.recipe] = scored[m.recipe]
            else:
                live[m.recipe] = server = live.pop(m.recipe, None) or ctx.launch(m)
                after = todo[todo.index(m) + 1:]
                if after:  # the next variant's server starts while this one scores
                    live[after[0].recipe] = ctx.launch(after[0])
                runs[m.recipe] = ctx.score(m, server=server)  # stops its server
                live.pop(m.recipe, None)
            r = runs[m.recipe]
            summary = ", ".join(f"{t}={x.value:.4f}" for t, x in r.tasks.items() if x.value is not None)
            tqdm.write(f"quantgate: {m.recipe}: {r.status} in {r.wall_seconds:.0f}s {summary} "
                       f"{r.reason or ''}".rstrip())
    finally:  # Ctrl-C or an error: no server outlives the stage
        for s in live.values():
            if s is not None:
                s.stop()
    emulated: dict[str, EvalRun] = {}
    if emulate:
        needs = [m for m in manifests if runs[m.recipe].status == "unsupported"]
        if needs:
            bf16 = manifests[0]
            for m in [bf16, *needs]:
                emulated[m.recipe] = ctx.score(m, EMULATED)
                tqdm.write(f"quantgate: {m.recipe}: {EMULATED}: {emulated[m.recipe].status}")
    baseline = runs["bf16"]
    if "bf16" in emulated:  # published: the gate compares emulated scores with this run, not with vLLM's
        emulated["bf16"].write(run_dir / "bf16" / "eval-emulated.json")
    for name, run in runs.items():
        if name in emulated and name != "bf16":
            # an emulated score is compared with bf16 through the same engine, and labelled everywhere
            run = add_comparisons(emulated[name], emulated["bf16"]).model_copy(
                update={"reason": f"vLLM: {run.reason}; scored {EMULATED}", "server_log_tail": run.server_log_tail})
        elif baseline.status == "ok":
            run = add_comparisons(run, baseline)
        run.write(run_dir / name / "eval.json")
        if name != "bf16":
            _write_divergence(run_dir, manifests, name, run, div)
    bad = [n for n, r in runs.items() if r.status == "failed"]
    if bad:
        tqdm.write(f"quantgate: eval failed for: {', '.join(bad)} (finished results kept)")
        return EXIT_PARTIAL
    return EXIT_OK
