"""The eval stage: each variant served by vLLM (the reference first) scores every task on the same items;
eval.json and divergence.json record what happened, by status code, for the gate and the report.

Work is planned in rounds of *sessions* (a server up, some tasks scored, the server down), always from
what is on disk: every (checkpoint, task) result is saved under a content key (checkpoint, task hash,
limit, seed, engine, server flags and environment, lm-eval/vLLM versions) the moment it is scored, so the
reference is scored once, a rerun redoes only what is missing, and the local loop and the Ray executor
(quantgate.cells) run the same plan.

Group-sequential tasks (binary, at least `quality.sequential.min_items` items; `--fixed-n` turns it off)
are scored look by look in a seeded order recorded in the result; after each round every variant's task is
tested against the Lan–DeMets boundaries at its stopping level (qgcore.stats.settle) and stops when settled;
the reference is scored only as far as some variant still needs. A variant whose checkpoint files are
damaged or whose config lies is `failed:checkpoint` (evals.scoring.preflight_reason); one the platform
has no kernel for is `unsupported on <platform>` before any server starts (qgcore.kernels), and scored
through transformers if asked (`emulated`); a server that will not start or dies is `failed:start` /
`failed:crash` with vLLM's last lines; a task that errors fails on its
own and the variant keeps the rest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals import divergence
from evals.quality import TaskIndex
from evals.scoring import (
    SEED,
    SessionResult,
    TaskSpec,
    Variant,
    Work,
    cached_topk,
    divergence_error,
    divergence_key,
    preflight_reason,
    score_session,
)
from evals.tasks import BUILTINS, build_builtin_suite, dataset_skip_reason, default_tasks, task_info, user_task_hash
from evals.variants import variant_manifests
from qgcore import provenance
from qgcore.artifacts import DivergenceRun, EvalRun, TaskResult
from qgcore.divergence import TOPK_METHOD, summarize
from qgcore.errors import EXIT_OK, EXIT_PARTIAL, ArtifactError
from qgcore.hashing import content_key
from qgcore.quality import QualityPolicy
from qgcore.run import RunContext
from qgcore.sequential import equal_looks
from qgcore.stats import SequentialSpec, look_statistics, settle
from qgcore.vocab import EMULATED, failed


@dataclass(frozen=True)
class Stopping:
    """The quality promise the eval stage stops by: the gate's policy and the run's declared family size."""

    quality: QualityPolicy
    k: int  # declared variants (run.json): each is stopped at alpha / k, its first Holm level
    fixed_n: bool = False  # --fixed-n: every task at its full n

    @property
    def on(self) -> bool:
        return self.quality.sequential.enabled and not self.fixed_n

    def key(self) -> dict[str, Any] | None:
        s = self.quality.sequential
        return {"min_items": s.min_items, "looks": s.looks, "seed": s.order_seed} if self.on else None


@dataclass
class EvalRequest:
    """What the user asked of the eval stage."""

    recipes: list[str] | None = None
    tasks: list[str] | None = None
    include_path: Path | None = None
    limit: int | None = None
    task_limits: dict[str, int | None] = field(default_factory=dict)  # per task (the demo's)
    emulate: bool = False
    force: bool = False
    verify: bool = False
    divergence_docs: int | None = None  # None: the stage default (evals.divergence.DEFAULT_DOCS)
    divergence_data: str | None = None
    divergence_tokens: int | None = None  # None: the platform's default, at most the served context
    stopping: Stopping | None = None
    demo: dict[str, Any] | None = None  # the demo sizing this request was filled with (recorded in eval.json)


class EvalStage:
    """The stage's inputs, resolved once: manifests, tasks, the (lazy) task index, divergence documents."""

    def __init__(self, ctx: RunContext, req: EvalRequest, *, quiet: bool = False):
        self.ctx, self.req, self.quiet = ctx, req, quiet
        self.manifests = variant_manifests(ctx.run_dir, req.recipes, verify=req.verify)
        self.reference = self.manifests[0].recipe
        self.tasks = list(req.tasks or default_tasks())
        if req.include_path is not None and not req.include_path.is_dir():
            raise ArtifactError(f"--include-path {req.include_path} is not a folder of lm-eval task YAMLs")
        self.suite = build_builtin_suite(ctx.cache_dir)
        self.index = TaskIndex([self.suite.include_dir] + ([req.include_path] if req.include_path else []))
        self.hashes = {t: self.suite.hashes.get(t) or user_task_hash(req.include_path, t) for t in self.tasks}
        self.variants = {m.recipe: Variant(m, ctx) for m in self.manifests}
        self._specs: dict[str, TaskSpec] = {}
        self.reference_ahead = False  # score the reference's every look at once (one server at a time)
        self._checked = False
        self.failures: dict[str, SessionResult] = {}  # variant -> its failed session (this invocation)
        self.sessions: dict[str, list[SessionResult]] = {}
        self.preflight = {n: preflight_reason(v) for n, v in self.variants.items()}
        st = req.stopping
        # sequential only where the run declares something to compare with; the settings are in every task key
        self.settings = st.key() if st is not None and st.k >= 1 else None
        # declared variants this stage does not score (a Ray cell scores one): the reference scores every
        # sequential task's first look for them
        self.absent = max((st.k if st else 0) - (len(self.variants) - 1), 0)
        docs = divergence.DEFAULT_DOCS if req.divergence_docs is None else req.divergence_docs
        self.div: divergence.DivergenceSet | None = None
        if docs > 0:
            ref = self.variants[self.reference]
            tokens = divergence.doc_tokens_for(ctx.platform.kind, ref.config.max_model_len, req.divergence_tokens)
            tok_key = content_key({f: r["sha256"] for f, r in ref.manifest.files.items() if "token" in f})
            self.div = divergence.build_set(ref.checkpoint, n_docs=docs, doc_tokens=tokens, data=req.divergence_data,
                                            cache_dir=ctx.cache_dir, tokenizer_key=tok_key)

    # ---- tasks ----

    def limit_of(self, task: str) -> int | None:
        return self.req.task_limits.get(task, self.req.limit)

    def key_spec(self, task: str, engine: str = "vllm") -> TaskSpec:
        """What a cache key needs, known without loading any data (emulation is always at fixed n)."""
        return TaskSpec(task, self.hashes[task], self.suite.sources.get(task), self.limit_of(task),
                        settings=self.settings if engine == "vllm" else None)

    def spec(self, task: str) -> TaskSpec:
        """The task as it will be scored from scratch (needs lm-eval's index: built only now)."""
        if task not in self._specs:
            if not self._checked:
                self.index.check(self.tasks)
                self._checked = True
            info = task_info(self.index.config(task))
            skip = None if task in BUILTINS else dataset_skip_reason(task, info)
            if skip and not self.quiet:
                tqdm.write(f"quantgate: skipping {task}: {skip}")
            spec = replace(self.key_spec(task), generative=info.generative, skip=skip)
            st = self.req.stopping
            if skip is None and st is not None and self.settings is not None and \
                    info.output_type in ("multiple_choice", "generate_until"):
                ids = self.index.items(task, self.limit_of(task))
                seq = st.quality.sequential
                if len(ids) >= seq.min_items:
                    random.Random(f"{seq.order_seed}:{task}").shuffle(ids)
                    spec = replace(spec, order=tuple(ids), looks=equal_looks(len(ids), seq.looks),
                                   order_seed=seq.order_seed)
            self._specs[task] = spec
        return self._specs[task]

    def spec_of(self, res: TaskResult) -> TaskSpec:
        """A saved sequential result carries its own plan: continuing it needs no task index."""
        seq = res.sequential or {}
        return replace(self.key_spec(res.task), generative=res.generation is not None,
                       order=tuple(seq.get("order", ())), looks=tuple(seq.get("looks", ())),
                       order_seed=int(seq.get("order_seed", 0)))

    def cached(self, name: str, task: str) -> TaskResult | None:
        """What needs no scoring in this run: a finished result, or a failure this run already met (a failure
        is retried by the next run, never again within this one)."""
        if self.req.force and not self.sessions.get(name):
            return None  # --force: everything of a variant is rescored in its first session
        v, spec = self.variants[name], self.key_spec(task)
        res = v.cached(spec)
        if res is None and self.sessions.get(name):
            saved = v.saved(spec)
            if saved is not None and saved.status.startswith("failed:"):
                return saved
        return res

    # ---- planning ----

    def plan_round(self) -> list[Work]:
        """The sessions to run next, the reference first; empty when everything is settled or done."""
        works: dict[str, Work] = {}
        ref_needs: dict[str, int] = {}  # sequential task -> how many looks the reference must have scored
        for name, v in self.variants.items():
            if self.preflight[name] is not None or name in self.failures:
                continue
            work = works.setdefault(name, Work(name, "vllm"))
            for task in self.tasks:
                res = self.cached(name, task)
                if res is None:
                    spec = self.spec(task)
                    if spec.skip:
                        v.save(TaskResult(key=v.key(spec), task=task, status="skipped:unreachable", reason=spec.skip,
                                          engine=v.engine, task_hash=spec.task_hash, source=spec.source,
                                          limit=spec.limit))
                    elif not spec.sequential:
                        work.tasks[task] = None
                    elif name != self.reference:
                        work.tasks[task] = 0
                        ref_needs[task] = max(ref_needs.get(task, 0), 1)
                    elif self.absent:
                        ref_needs[task] = max(ref_needs.get(task, 0), 1)
                elif name != self.reference and res.sequential is not None and res.status == "scored":
                    mine = res.sequential["scored_looks"]
                    ref = self.cached(self.reference, task)
                    theirs = ref.sequential["scored_looks"] if ref is not None and ref.sequential else 0
                    settled = self.settled(name, task) if theirs >= mine else None
                    if res.sequential.get("settled") != settled:  # why scoring stopped (or None): recorded
                        v.save(res.model_copy(update={"sequential": res.sequential | {"settled": settled}}))
                    if theirs < mine:  # the reference must catch up before this variant is decided
                        ref_needs[task] = max(ref_needs.get(task, 0), mine)
                    elif settled is None and mine < len(res.sequential["looks"]):
                        work.tasks[task] = mine
                        ref_needs[task] = max(ref_needs.get(task, 0), mine + 1)
            if self.div is not None and not self.sessions.get(name) and divergence_error(v) is None and \
                    (self.req.force or cached_topk(v, self.div) is None):
                work.divergence = True
        ref_work = works.get(self.reference)
        if ref_work is not None:  # the reference scores what some variant still needs, one look a round
            for task, need in ref_needs.items():
                res = self.cached(self.reference, task)
                if res is not None and res.status != "scored":
                    continue  # the reference failed this task in this run: the gate makes it inconclusive
                have = res.sequential["scored_looks"] if res is not None and res.sequential else 0
                if self.reference_ahead:  # every look, so each variant's looks are decided in one session
                    need = len(res.sequential["looks"]) if res is not None and res.sequential else len(
                        self.spec(task).looks)
                if have < need:
                    ref_work.tasks[task] = have
        return [w for w in works.values() if w]

    def _own_decision(self, name: str, task: str) -> str | None:
        """A variant's sequential task, tested at the last look both it and the reference scored: promote /
        fail / futile at the variant's stopping level, or None (score on)."""
        st = self.req.stopping
        res, ref = self.cached(name, task), self.cached(self.reference, task)
        if st is None or res is None or ref is None or res.sequential is None or ref.sequential is None:
            return None
        look = min(res.sequential["scored_looks"], ref.sequential["scored_looks"]) - 1
        if look < 0:
            return None
        spec = SequentialSpec(list(res.sequential["order"]), list(res.sequential["looks"]),
                              st.quality.sequential.spending, look)
        m = self.variants[name].manifest
        margin = st.quality.margin_for(m.family, res.metric or "acc", (m.recipe_spec.get("gate") or {}).get(
            "quality_margin"))
        base = {k: (v[0], v[1]) for k, v in ref.items.items()}
        cand = {k: (v[0], v[1]) for k, v in res.items.items()}
        try:
            path = look_statistics(base, cand, spec, margin)
        except KeyError:
            return None  # an item one of them lacks: the gate calls the task inconclusive; nothing to settle
        return settle(path, look=look, n_looks=len(spec.looks), design=spec.design,
                      alpha=st.quality.stopping_level(st.k), futility=st.quality.sequential.futility)

    def settled(self, name: str, task: str) -> str | None:
        """Why a variant's sequential task needs no more items: its own decision, or "variant" when another
        of its sequential tasks already shows the variant cannot be promoted (every task must pass)."""
        own = self._own_decision(name, task)
        if own is not None:
            return own
        for other in self.tasks:
            if other != task and self._own_decision(name, other) in ("fail", "futile"):
                return "variant"
        return None

    # ---- running ----

    def run_local(self, progress: Callable[[str], None] | None = None) -> None:
        """Every round in this process. On CPU the next session's server launches while one scores, and the
        servers a later round needs stay up between rounds (as many as RAM allows, the reference first): a
        group-sequential round then costs scoring, not start-ups. On a GPU each server takes most of the
        card: one at a time (run_one_at_a_time)."""
        if self.ctx.platform.kind != "cpu":
            return self.run_one_at_a_time(progress)
        rounds = 0
        pool: dict[str, Any] = {}  # variant -> a healthy server kept for the next round (CPU only)
        try:
            while work := self.plan_round():
                rounds += 1
                for i, w in enumerate(work):
                    if progress:
                        progress(f"{w.variant} (round {rounds})")
                    server = pool.pop(w.variant, None) or self.variants[w.variant].server()
                    nxt = work[i + 1].variant if i + 1 < len(work) else None
                    if nxt is not None and nxt not in pool and self.ctx.platform.kind == "cpu":
                        pool[nxt] = self.variants[nxt].server().launch()
                    keep = self._keep(w.variant, pool)
                    res = self.run_session(w, server, keep=keep)
                    self.record(res)
                    if keep and res.status == "served":
                        pool[w.variant] = server
        finally:  # Ctrl-C, an error or the end: no server outlives the stage
            for s in pool.values():
                s.stop()

    def run_one_at_a_time(self, progress: Callable[[str], None] | None = None) -> None:
        """One server at a time, each up from its variant's first look to its last: the reference scores every
        look of a sequential task in its one session (`reference_ahead`), so a variant's looks can be decided
        as they are scored, without a restart in between. K + 1 start-ups for K variants, where a round per
        look would restart every server at every look (minutes each for a 70B); the price is the reference's
        looks that no variant ends up needing."""
        self.reference_ahead = True
        sessions = 0
        work = self.plan_round()
        while work:
            w: Work | None = work[0]  # the reference first, then each variant in the run's order
            server = self.variants[work[0].variant].server()
            try:
                while w is not None:
                    sessions += 1
                    if progress:
                        progress(f"{w.variant} (session {sessions})")
                    res = self.run_session(w, server, keep=True)
                    self.record(res)
                    work = self.plan_round()  # its next look runs on the server that is already up
                    w = next((x for x in work if x.variant == w.variant), None) if res.status == "served" else None
            finally:  # Ctrl-C, an error or its last look: the next variant gets the card
                server.stop()

    def _keep(self, name: str, pool: dict[str, Any]) -> bool:
        """Keep this variant's server up after its session: CPU only, while the pool fits half the RAM."""
        if self.ctx.platform.kind != "cpu" or self.settings is None:
            return False
        import psutil

        def need(n: str) -> float:
            v = self.variants[n]
            return v.manifest.bytes_on_disk * 1.5 + v.config.cpu_kv_cache_gib * 2**30 + 2 * 2**30

        budget = psutil.virtual_memory().total * 0.5
        return need(name) + sum(need(n) for n in pool) <= budget

    def run_session(self, w: Work, server: Any = None, keep: bool = False) -> SessionResult:
        """One session (also what a Ray cell runs): score `w` on its variant's server."""
        v = self.variants[w.variant]
        specs = {}
        for task, look in w.tasks.items():
            res = self.cached(w.variant, task) if look else None
            specs[task] = self.spec_of(res) if res is not None and res.sequential else self.spec(task)
        return score_session(v, w, specs, self.index, self.div, server or v.server(), keep=keep)

    def record(self, res: SessionResult) -> None:
        self.sessions.setdefault(res.variant, []).append(res)
        if res.status != "served":
            self.failures[res.variant] = res
        if not self.quiet:
            tqdm.write(f"quantgate: {res.variant}: session {res.status} in {res.seconds:.0f}s "
                       f"{res.reason or ''}".rstrip())

    # ---- results ----

    def emulate(self) -> dict[str, EvalRun]:
        """Score the variants no kernel serves here through transformers, against the reference through the
        same engine (fixed n), when asked."""
        needs = [n for n, why in self.preflight.items() if why and why[0] == "unsupported"]
        if not self.req.emulate or not needs:
            return {}
        out = {}
        for name in [self.reference, *needs]:
            v = Variant(self.variants[name].manifest, self.ctx, EMULATED)
            todo = Work(name, EMULATED, {t: None for t in self.tasks if v.cached(self.key_spec(t, EMULATED)) is None
                                         and not self.spec(t).skip},
                        divergence=self.div is not None and cached_topk(v, self.div) is None)
            if todo:
                score_session(v, todo, {t: self.spec(t).fixed() for t in todo.tasks}, self.index, self.div)
            out[name] = self.eval_run(v, vllm_status="unsupported" if name != self.reference else None)
            if not self.quiet:
                tqdm.write(f"quantgate: {name}: {EMULATED}: {out[name].status}")
        return out

    def eval_run(self, v: Variant, *, vllm_status: str | None = None) -> EvalRun:
        name = v.name
        tasks = {t: r for t in self.tasks if (r := v.saved(self.key_spec(t, v.engine))) is not None}
        sessions = self.sessions.get(name, []) if v.engine == "vllm" else []
        status, reason, tail = "served", None, []
        if v.engine == EMULATED:
            why = self.preflight.get(name)
            status, reason = "emulated", f"{why[1] if why else 'the reference'}; scored {EMULATED}"
        elif self.preflight.get(name) is not None:
            status, reason = self.preflight[name]  # type: ignore[misc]
        elif name in self.failures:
            f = self.failures[name]
            status, reason, tail = f.status, f.reason, f.log_tail
        server = next((s.server for s in sessions if s.server), {})
        if not server and v.engine == "vllm":
            server = self._previous_server(v)
        kernels = dict(server.get("kernels") or {})
        if v.engine == "vllm":
            kernels["preflight"] = v.support().to_dict()
        return EvalRun(
            variant=name, family=v.manifest.family, status=status, reason=reason, engine=v.engine,  # type: ignore[arg-type]
            platform=self.ctx.platform.to_dict(), vllm_status=vllm_status, manifest_key=v.manifest.content_key,  # type: ignore[arg-type]
            tasks=tasks, server=server, kernels=kernels, server_log_tail=tail,
            provenance={"versions": provenance.versions(("lm_eval", "transformers", "torch"))
                        | {"vllm": v.vllm_version()},
                        "hardware": provenance.hardware(), "limit": self.req.limit,
                        "task_limits": {t: self.limit_of(t) for t in self.tasks}, "seed": SEED, "flags": v.flags(),
                        "task_hashes": {t: self.hashes[t] for t in self.tasks}, "task_sources": self.suite.sources,
                        "sequential": self.settings, "serving": v.ctx.serving(v.manifest).to_dict(),
                        "demo": self.req.demo,
                        "sessions": [{"status": s.status, "seconds": s.seconds,
                                      "startup_seconds": s.server.get("startup_seconds")} for s in sessions]},
            wall_seconds=round(sum(s.seconds for s in sessions), 1),
        )

    def _previous_server(self, v: Variant) -> dict[str, Any]:
        """Every pair cached: keep how the variant was served when it was scored."""
        path = v.vdir / "eval.json"
        try:
            old = EvalRun.read(path) if path.is_file() else None
        except ArtifactError:
            return {}
        return old.server if old and old.manifest_key == v.manifest.content_key and old.engine == "vllm" else {}

    def write(self) -> int:
        """eval.json and divergence.json for every variant; the stage's exit code."""
        emulated = self.emulate()
        ref_emulated = emulated.pop(self.reference, None)
        if ref_emulated is not None:  # the comparison engine of every emulated variant
            ref_emulated.write(self.ctx.run_dir / self.reference / "eval-emulated.json")
        bad = []
        for name, v in self.variants.items():
            run = emulated.get(name) or self.eval_run(v)
            run.write(v.vdir / "eval.json")
            lost = [t for t, r in run.tasks.items() if failed(r.status)]
            if failed(run.status) or lost:  # a lost task is lost work too: the variant's other tasks are kept
                bad.append(name if not lost or failed(run.status) else f"{name} ({', '.join(lost)})")
            if name != self.reference:
                self._write_divergence(v, EMULATED if name in emulated else "vllm")
            if not self.quiet:
                summary = ", ".join(f"{t}={x.value:.4f}" for t, x in run.tasks.items() if x.value is not None)
                tqdm.write(f"quantgate: {name}: {run.status} {summary} {run.reason or ''}".rstrip())
        if bad:
            tqdm.write(f"quantgate: eval failed for: {', '.join(bad)} (finished results kept)")
            return EXIT_PARTIAL
        return EXIT_OK

    def _write_divergence(self, v: Variant, engine: str) -> None:
        path = v.vdir / "divergence.json"
        if self.div is None:  # not asked for: an old file would describe other documents or another checkpoint
            path.unlink(missing_ok=True)
            return
        mine_v = Variant(v.manifest, self.ctx, engine)
        ref_v = Variant(self.variants[self.reference].manifest, self.ctx, engine)
        base = {"variant": v.name, "engine": engine, "reference_engine": engine,
                "key": content_key([divergence_key(mine_v, self.div), divergence_key(ref_v, self.div)]),
                "k": divergence.TOP_K, "method": TOPK_METHOD, "source": self.div.source, "n_docs": len(self.div.docs),
                "doc_tokens": len(self.div.docs[0]), "max_model_len": v.config.max_model_len}
        mine, theirs = cached_topk(mine_v, self.div), cached_topk(ref_v, self.div)
        if mine is None or theirs is None:
            who = mine_v if mine is None else ref_v
            err = divergence_error(who)
            why = err or f"{who.name} {self._why_unserved(who.name)}"
            res = DivergenceRun(status="failed:fetch" if err else "skipped:unserved",
                                reason=f"no top-k log-probs for {who.name}: {why}", **base)
        else:
            stats = summarize(theirs, mine, len(self.div.docs[0]) + 1)
            res = DivergenceRun(status="measured", overall=stats["overall"], by_depth=stats["by_depth"],
                                doc_kl_mean=stats["doc_kl_mean"], **base)
            o = res.overall
            if not self.quiet:
                tqdm.write(f"quantgate: {v.name}: KL from {self.reference} mean {o['kl_mean']:.4f} p99 "
                           f"{o['kl_p99']:.4f}, top-1 agreement {o['top1_agreement']:.3f} ({o['n_tokens']} tokens, "
                           f"{engine})")
        res.write(path)

    def _why_unserved(self, name: str) -> str:
        if self.preflight.get(name):
            return f"was not served ({self.preflight[name][0]})"  # type: ignore[index]
        if name in self.failures:
            return f"was not served ({self.failures[name].status})"
        return "was not scored"


def run_eval_stage(ctx: RunContext, req: EvalRequest) -> int:
    """Score every variant (the reference first) and write eval.json + divergence.json."""
    stage = EvalStage(ctx, req)
    bar = tqdm(desc="eval", unit="session")
    started = time.perf_counter()

    def progress(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    try:
        stage.run_local(progress)
    finally:
        bar.close()
    code = stage.write()
    tqdm.write(f"quantgate: eval stage {time.perf_counter() - started:.0f}s")
    return code
