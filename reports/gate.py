"""The promotion gate: a pure, stdlib-only function from evidence + policy to a verdict with reasons.

Quality is *non-inferiority* on every task (an intersection-union test: a variant passes only if it passes
each task, so tasks need no correction among themselves). Each task's test is one-sided at the variant's
level: its calibrated p-value (qgcore.stats) must fall below the level, which is the same as its bound at
that level clearing the margin. Levels come from Holm's step-down over the run's *declared* variants
(run.json), so the chance that a run promotes any variant whose true loss is at its margin stays within
`quality.alpha`. A task whose reference is not shown above chance, whose items are not all paired, or that
has too few items decides nothing. A recovery floor only ever rejects: it fails a variant whose ratio is
shown below it, and never holds one back for lack of evidence (the margin decides promotion).

Checks are registered (`@gate_check`): each names its policy section (a stdlib dataclass the policy loader
validates strictly) and where the report shows its evidence. No torch, no pydantic, no numpy: CI can run
this on artifacts copied from a GPU box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qgcore.quality import QualityPolicy, RecipeGate, holm_levels
from qgcore.vocab import EMULATED, SCORED, failed

Outcome = Literal["pass", "fail", "inconclusive", "skipped"]  # skipped: noted, decides nothing
Verdict = Literal["promote", "reject", "inconclusive"]


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "quality:qg_mmlu_dev", "performance:throughput"
    outcome: Outcome
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    variant: str
    verdict: Verdict
    checks: list[Check]
    level: float  # the one-sided level the variant's tasks were tested at (its Holm step)
    p_value: float  # the variant's quality p-value (the largest over its tasks)
    cost_per_1m: float | None = None
    bytes_on_disk: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evidence:
    """One variant's artifacts (plain dicts) with the reference's, and the comparisons the gate tests:
    qgcore.stats.Comparison dicts against the reference through the same engine, at every Holm level."""

    name: str
    family: str
    reference: str
    recipe_gate: RecipeGate
    eval: dict[str, Any] | None
    reference_eval: dict[str, Any] | None
    comparisons: dict[str, dict[str, Any]]
    bench: dict[str, Any] | None = None
    reference_bench: dict[str, Any] | None = None
    divergence: dict[str, Any] | None = None
    bytes_on_disk: int | None = None


@dataclass(frozen=True)
class CheckSpec:
    name: str  # the policy section's key, and the prefix of every check it makes
    section: type
    run: Callable[[Evidence, Any, float], list[Check]]  # (evidence, its policy section, the variant's level)
    anchor: Callable[[str, str], str]  # (check name, variant) -> where the report shows its evidence


CHECKS: dict[str, CheckSpec] = {}


def gate_check(name: str, section: type, anchor: Callable[[str, str], str]) \
        -> Callable[[Callable[[Evidence, Any, float], list[Check]]], Callable[[Evidence, Any, float], list[Check]]]:
    """Register a check: adding one is this decorator, its policy section dataclass and its YAML key."""
    def register(fn: Callable[[Evidence, Any, float], list[Check]]) -> Callable[[Evidence, Any, float], list[Check]]:
        CHECKS[name] = CheckSpec(name, section, fn, anchor)
        return fn
    return register


@dataclass(frozen=True)
class GatePolicy:
    """Every registered check's section, validated (reports.policy). The defaults live in the shipped YAML."""

    sections: dict[str, Any]

    @property
    def quality(self) -> QualityPolicy:
        q = self.sections["quality"]
        assert isinstance(q, QualityPolicy)
        return q

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]


# ---- quality ---------------------------------------------------------------------------------------------

def _lk(a: float) -> str:  # qgcore.stats.level_key, without importing numpy
    return repr(float(a))


def _fmt_level(a: float) -> str:
    return f"{a:.3%}".rstrip("0").rstrip(".") if a < 0.01 else f"{a:.2%}".rstrip("0").rstrip(".")


def task_p_value(comp: dict[str, Any], q: QualityPolicy) -> float:
    """The task's p-value for "passes at level a" (pass iff p < a): non-inferiority, and the reference above
    chance where the task has a chance rate; 1 where the task cannot decide (unpaired items, too few)."""
    kind = "binary" if comp.get("binary") else "continuous"
    if comp.get("n_unmatched") or comp["n_items"] < q.min_items[kind]:  # type: ignore[index]
        return 1.0
    p = float(comp["p_noninferior"])
    if comp.get("chance") is not None:
        above = comp.get("p_above_chance")
        p = max(p, float(above) if above is not None else 1.0)
    return p


def quality_p_value(ev: Evidence, q: QualityPolicy) -> float:
    """The variant's quality p-value: the largest over its tasks (it must pass every one); 1 when any task
    cannot be scored or compared, or none was."""
    run = ev.eval or {}
    if run.get("status") not in ("served", "emulated"):
        return 1.0
    if run.get("engine") == EMULATED and not q.allow_emulated:
        return 1.0
    ps = []
    for task, res in (run.get("tasks") or {}).items():
        if str(res.get("status", "")).startswith("skipped"):
            continue
        if res.get("status") != SCORED or task not in ev.comparisons:
            return 1.0
        ps.append(task_p_value(ev.comparisons[task], q))
    return max(ps) if ps else 1.0


def _interval(comp: dict[str, Any], level: float) -> tuple[float, float]:
    lo, hi = comp["intervals"].get(_lk(level), [float("nan"), float("nan")])
    return float(lo), float(hi)


def _seq_text(comp: dict[str, Any]) -> str:
    s = comp.get("sequential")
    if not s:
        return ""
    j, k = s["stopped_at"] + 1, len(s["looks"])
    return (f"; group-sequential, look {j} of {k}: {s['items_scored']} of {s['items_planned']} items "
            f"({s['items_saved']} saved), repeated CI")


def quality_task_check(task: str, comp: dict[str, Any], q: QualityPolicy, level: float, *,
                       ref_name: str = "the reference") -> Check:
    """Non-inferiority on one task's paired comparison at one-sided `level`."""
    hib = comp["higher_is_better"]
    lo, hi = _interval(comp, level)
    d, margin = comp["delta"], comp["margin"]
    kind = "binary" if comp.get("binary") else "continuous"
    nums = {"delta": d, "ci_low": lo, "ci_high": hi, "level": level, "method": comp.get("method"), "margin": margin,
            "n_items": comp["n_items"], "n_unmatched": comp.get("n_unmatched", 0), "recovery": comp.get("recovery"),
            "higher_is_better": hib, "p_noninferior": comp["p_noninferior"], "p_inferior": comp["p_inferior"],
            "sequential": comp.get("sequential")}
    ci = (f"delta {d:+.4f} (bounds at {_fmt_level(level)} one-sided: {lo:+.4f}..{hi:+.4f}), margin {margin:.4f}, "
          f"n={comp['n_items']}{_seq_text(comp)}")
    name = f"quality:{task}"
    if comp.get("n_unmatched"):
        return Check(name, "inconclusive", f"{task}: {comp['n_unmatched']} items scored by only one of "
                     f"{ref_name}/variant: not a paired comparison; rerun eval for both; {ci}", nums)
    chance = comp.get("chance")
    if chance is not None and not (comp.get("p_above_chance") is not None and comp["p_above_chance"] < level):
        nums |= {"chance": chance, "p_above_chance": comp.get("p_above_chance"), "recovery": None}
        return Check(name, "inconclusive", f"{task}: {ref_name} scores {comp.get('baseline', float('nan')):.3f}, "
                     f"not shown above chance {chance:.3f} at {_fmt_level(level)}: this task decides nothing here",
                     nums)
    if comp["p_inferior"] < level:
        return Check(name, "fail", f"{task}: worse than {ref_name} beyond the margin: {ci}", nums)
    floor = comp.get("floor")
    if floor is not None and comp.get("p_below_floor") is not None and comp["p_below_floor"] < level:
        best = comp.get("recovery_upper", {}).get(_lk(level))
        nums |= {"floor": floor, "recovery_upper": best}
        return Check(name, "fail", f"{task}: recovery {comp['recovery']:.1%} (at best {best:.1%}) shown below the "
                     f"floor {floor:.0%}; {ci}", nums)
    need = q.min_items[kind]  # type: ignore[index]
    if comp["n_items"] < need:
        return Check(name, "inconclusive", f"{task}: only {comp['n_items']} items (< {need} for a {kind} metric): "
                     f"too few to show non-inferiority; {ci}", nums)
    if comp["p_noninferior"] < level:
        return Check(name, "pass", f"{task}: non-inferior: {ci}", nums)
    if comp.get("method", "").endswith("undefined here"):
        return Check(name, "inconclusive", f"{task}: the BCa interval is undefined on these items (no percentile "
                     f"fallback): {ci}", nums)
    return Check(name, "inconclusive", f"{task}: CI too wide to decide: {ci}", nums)


def _quality_anchor(check: str, variant: str) -> str:
    task = check.split(":", 1)[1] if ":" in check else ""
    return f"#task-{task}" if task and task not in ("serve", "eval", "engine", "tasks") else "#quality"


@gate_check("quality", QualityPolicy, _quality_anchor)
def quality_checks(ev: Evidence, q: QualityPolicy, level: float) -> list[Check]:
    run = ev.eval
    ref = ev.reference
    if run is None:
        return [Check("quality:eval", "inconclusive", f"{ev.name} has no eval.json: run `make eval`")]
    status = run.get("status")
    if failed(status):
        return [Check("quality:serve", "fail", f"{ev.name} could not be served and scored ({status}): "
                      f"{run.get('reason') or 'no reason recorded'}")]
    if status == "unsupported":
        return [Check("quality:serve", "inconclusive", f"{run.get('reason')}; measure it on a platform that has the "
                      "kernels, or score it with --emulate-unsupported")]
    checks = []
    emulated = run.get("engine") == EMULATED
    if emulated and not q.allow_emulated:
        checks.append(Check("quality:engine", "inconclusive",
                            f"scores are {EMULATED}, not vLLM serving: cannot promote on emulation alone"))
    ref_tasks = (ev.reference_eval or {}).get("tasks") or {}
    for task, res in (run.get("tasks") or {}).items():
        st = str(res.get("status"))
        if st.startswith("skipped"):
            checks.append(Check(f"quality:{task}", "skipped", f"{task} skipped: {res.get('reason')}"))
            continue
        if failed(st):
            checks.append(Check(f"quality:{task}", "fail", f"{task} could not be scored on {ev.name} ({st}): "
                                f"{res.get('reason')}"))
            continue
        rt = ref_tasks.get(task) or {}
        if rt.get("status") != SCORED:
            checks.append(Check(f"quality:{task}", "inconclusive", f"{task}: {ref} has no score to compare with "
                                f"({rt.get('status', 'not scored')}: {rt.get('reason') or 'no result'})"))
            continue
        if task not in ev.comparisons:
            checks.append(Check(f"quality:{task}", "inconclusive", f"{task}: no paired comparison with {ref}"))
            continue
        c = quality_task_check(task, ev.comparisons[task], q, level, ref_name=ref)
        if emulated:
            c = Check(c.name, c.outcome, f"{c.reason} [{EMULATED}]", c.numbers)
        checks.append(c)
    if not any(c.outcome != "skipped" and c.name != "quality:engine" for c in checks):
        checks.append(Check("quality:tasks", "inconclusive", "no task was scored: nothing shows quality"))
    return checks


# ---- performance, memory, divergence --------------------------------------------------------------------

@dataclass(frozen=True)
class PerformancePolicy:
    __pydantic_config__ = {"extra": "forbid"}
    # the variant's output tok/s must be at least (1 - margin) x the reference's at the same load (the lower
    # of the two capacities), on the interval of interleaved pairs (non-inferiority, like quality); null: off
    throughput_margin: float | None
    require_slo: bool  # some load must meet the latency SLO

    def __post_init__(self) -> None:
        if self.throughput_margin is not None and not 0 <= self.throughput_margin < 1:
            raise ValueError("performance.throughput_margin must be in [0, 1) or null")


def _bench_anchor(check: str, variant: str) -> str:
    return f"#bench-{variant}"


@gate_check("performance", PerformancePolicy, _bench_anchor)
def performance_checks(ev: Evidence, p: PerformancePolicy, level: float) -> list[Check]:
    bench = ev.bench
    if p.throughput_margin is None and not p.require_slo:
        return []  # the policy asks nothing of the bench
    if bench is None:
        return [Check("performance:bench", "inconclusive", "no bench.json: run `make bench`")]
    status = bench.get("status")
    if status != "served":
        outcome: Outcome = "inconclusive" if status in ("unsupported", "skipped:unservable") else "fail"
        return [Check("performance:bench", outcome, f"bench {status}: {bench.get('reason')}")]
    checks = []
    cap = bench.get("capacity") or {}
    slo = bench.get("slo", {})
    slo_txt = f"TTFT p95 <= {slo.get('ttft_p95_s')} s, ITL p95 <= {slo.get('itl_p95_ms')} ms"
    if p.require_slo:
        if not cap.get("load"):
            checks.append(Check("performance:latency_slo", "fail", f"no load meets the SLO ({slo_txt})",
                                {"capacity": cap}))
        else:
            checks.append(Check("performance:latency_slo", "pass", f"meets the SLO ({slo_txt}) up to "
                                f"{cap['load_kind']} {cap['load']}", {"capacity": cap}))
    if p.throughput_margin is not None:
        ratio = bench.get("throughput_vs_reference")
        floor = 1 - p.throughput_margin
        if not ratio:
            who = ev.reference if ev.reference_bench is None or not (ev.reference_bench.get("capacity") or {}).get(
                "load") else ev.name
            checks.append(Check("performance:throughput", "inconclusive" if who == ev.reference else "fail",
                                f"no throughput at capacity for {who}: nothing to compare", {}))
        else:
            lo, hi = ratio["low"], ratio["high"]
            nums = ratio | {"floor": floor}
            at = f"at {cap.get('load_kind', 'concurrency')} {ratio['load']}" if ratio.get("load") else "at capacity"
            seq = (f"repeated interval, look {ratio['look']} of {ratio['looks']}" if ratio.get("looks", 1) > 1
                   else "interval")
            txt = (f"{ratio['ratio']:.3f}x {ev.reference}'s output tok/s {at} ({ratio['level']:.0%} {seq} "
                   f"{lo:.3f}..{hi:.3f} over {ratio['pairs']} interleaved pairs), floor {floor:.2f}x")
            outcome = "pass" if lo > floor else "fail" if hi < floor else "inconclusive"
            checks.append(Check("performance:throughput", outcome, txt, nums))
    return checks


@dataclass(frozen=True)
class MemoryPolicy:
    __pydantic_config__ = {"extra": "forbid"}
    max_gib: float | None  # cap on what the variant needs: weights + KV bytes x context x concurrent sequences

    def __post_init__(self) -> None:
        if self.max_gib is not None and self.max_gib <= 0:
            raise ValueError("memory.max_gib must be > 0 or null")


@gate_check("memory", MemoryPolicy, lambda check, variant: "#memory")
def memory_checks(ev: Evidence, p: MemoryPolicy, level: float) -> list[Check]:
    if p.max_gib is None:
        return []
    mem = (ev.bench or {}).get("memory", {})
    need = mem.get("need_bytes")
    cap = int(p.max_gib * 2**30)
    if need is None:
        return [Check("memory:cap", "inconclusive", "the variant's memory need is unknown (no vLLM accounting of "
                      "weights and KV cache in bench.json)", {"cap_bytes": cap})]
    ok = need <= cap
    return [Check("memory:cap", "pass" if ok else "fail", f"needs {need / 2**30:.2f} GiB ({mem.get('need_source')}) "
                  f"vs cap {p.max_gib:.2f} GiB", {"need_bytes": need, "cap_bytes": cap})]


@dataclass(frozen=True)
class DivergencePolicy:
    __pydantic_config__ = {"extra": "forbid"}
    # Diagnostic by default (null: no cap): KL measures how *different* a variant is, not how much *worse*
    kl_p99_max: dict[Literal["8bit", "4bit"], float | None]
    top1_min: dict[Literal["8bit", "4bit"], float | None]

    def __post_init__(self) -> None:
        if any(v is not None and v <= 0 for v in self.kl_p99_max.values()) or \
                any(v is not None and not 0 < v <= 1 for v in self.top1_min.values()):
            raise ValueError("divergence.kl_p99_max must be > 0 and divergence.top1_min in (0, 1]")


@gate_check("divergence", DivergencePolicy, lambda check, variant: "#divergence")
def divergence_checks(ev: Evidence, p: DivergencePolicy, level: float) -> list[Check]:
    """Caps on divergence from the reference where the policy sets them; otherwise a note with the numbers
    (deciding nothing). A failed diagnostic never fails a variant unless the policy caps it."""
    div = ev.divergence
    cap, floor = p.kl_p99_max.get(ev.family), p.top1_min.get(ev.family)  # type: ignore[call-overload]
    if div is None or div.get("status") != "measured":
        why = "no divergence.json (eval ran with --divergence-docs 0)" if div is None else \
            f"divergence {div.get('status')}: {div.get('reason')}"
        if cap is None and floor is None:
            return [Check("divergence", "skipped", f"{why}; diagnostic only (no cap in the policy)")]
        return [Check("divergence", "inconclusive", f"{why}; the policy caps divergence for {ev.family}: rerun eval "
                      "with --divergence-docs N")]
    o = div.get("overall", {})
    kl99, top1 = float(o["kl_p99"]), float(o["top1_agreement"])
    nums = {"kl_mean": o.get("kl_mean"), "kl_p99": kl99, "top1_agreement": top1, "n_tokens": o.get("n_tokens"),
            "engine": div.get("engine"), "kl_p99_max": cap, "top1_min": floor}
    txt = (f"KL from {ev.reference} mean {o.get('kl_mean', float('nan')):.4f}, p99 {kl99:.4f} nats; top-1 agreement "
           f"{top1:.3f} over {o.get('n_tokens')} tokens ({div.get('engine')})")
    if cap is None and floor is None:
        return [Check("divergence", "skipped", f"{txt}; diagnostic only (no cap in the policy)", nums)]
    checks = []
    if cap is not None:
        bad = kl99 > cap
        checks.append(Check("divergence:kl_p99", "fail" if bad else "pass",
                            f"{txt}; p99 {'above' if bad else 'within'} the cap {cap} for {ev.family}", nums))
    if floor is not None:
        bad = top1 < floor
        where = "below" if bad else "at or above"
        checks.append(Check("divergence:top1", "fail" if bad else "pass",
                            f"{txt}; top-1 agreement {where} {floor} for {ev.family}", nums))
    return checks


# ---- the verdict ------------------------------------------------------------------------------------------

def decide(evidence: dict[str, Evidence], policy: GatePolicy, *, k: int) -> list[Decision]:
    """Every variant's verdict: quality p-values, Holm levels over the k declared variants, then every
    registered check at the variant's level."""
    q = policy.quality
    pvals = {name: quality_p_value(ev, q) for name, ev in evidence.items()}
    levels = holm_levels(pvals, k, q.alpha, q.multiplicity)
    out = []
    for name, ev in evidence.items():
        checks = [c for spec in CHECKS.values() for c in spec.run(ev, policy[spec.name], levels[name])]
        outcomes = {c.outcome for c in checks}
        verdict: Verdict = "reject" if "fail" in outcomes else "inconclusive" if "inconclusive" in outcomes \
            else "promote"
        cap = (ev.bench or {}).get("capacity") or {}
        out.append(Decision(name, verdict, checks, levels[name], pvals[name], cap.get("usd_per_1m_output_tokens"),
                            ev.bytes_on_disk))
    return out


def recommend(decisions: list[Decision]) -> Decision | None:
    """The cheapest promoted variant: lowest $/1M output tokens at its capacity, then fewest bytes."""
    ok = [d for d in decisions if d.verdict == "promote"]
    if not ok:
        return None
    return min(ok, key=lambda d: (d.cost_per_1m if d.cost_per_1m is not None else float("inf"),
                                  d.bytes_on_disk or 0, d.variant))


def anchor(check: str, variant: str) -> str:
    """Where a verdict row's evidence is in the report."""
    spec = CHECKS.get(check.split(":", 1)[0])
    return spec.anchor(check, variant) if spec else "#verdict-table"
