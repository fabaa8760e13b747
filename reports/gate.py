"""The promotion gate: a pure, stdlib-only function from evidence + policy to a verdict with reasons.

Quality is *non-inferiority*: a variant passes a task only if the whole paired CI of (variant - bf16)
lies strictly on the good side of -margin (compared exactly, as fractions: a bound sitting on the margin
does not pass). The CI's level is family-wise (Bonferroni over the competing variants by default), so
the chance of promoting *any* variant whose true delta is at its margin stays within the policy's alpha.
If the CI straddles the margin the answer is "inconclusive", never "pass". A task whose bf16 score is
not above its chance rate, or whose items are not all paired, decides nothing. Performance, latency SLO
and memory are floors/caps against measured numbers. No torch, no pydantic: CI can run this on
artifacts copied from a GPU box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Literal

from qgcore.vocab import EMULATED

Outcome = Literal["pass", "fail", "inconclusive", "skipped"]  # skipped: noted, decides nothing
Verdict = Literal["promote", "reject", "inconclusive"]


@dataclass(frozen=True)
class GatePolicy:
    """What the gate enforces. No defaults here: reports/policy.default.yaml holds them (reports.policy)."""

    margins: dict[str, float]  # family -> non-inferiority margin in metric units (absolute)
    metric_margins: dict[str, float]  # metric name -> its own margin (e.g. bits_per_byte)
    recovery_min: dict[str, float]  # family -> floor (e.g. 0.97); absent = off
    min_items: int
    throughput_floor_vs_bf16: float | None  # variant tok/s at its SLO point >= this x bf16's
    require_slo: bool  # some concurrency level must meet the latency SLO
    max_memory_bytes: int | None  # cap on the server's peak memory (GPU or host RSS as measured)
    allow_emulated: bool  # an emulated score can at best be inconclusive unless this is true
    alpha: float  # 1 - confidence level of the CIs, for the whole family of competing variants
    multiplicity: str  # how alpha is split over k competing variants: bonferroni | none
    kl_p99_max: dict[str, float] = field(default_factory=dict)  # family -> cap on p99 token KL; absent = none
    top1_min: dict[str, float] = field(default_factory=dict)  # family -> floor on top-1 agreement with bf16


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
    cost_per_1m: float | None = None
    bytes_on_disk: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RecipeGate:
    """A recipe's own gate section: None means the policy's value for the recipe's family."""

    quality_margin: float | None = None  # replaces the family margin (accuracy-type metrics only)
    recovery_min: float | None = None  # replaces the family recovery floor


def margin_for(policy: GatePolicy, family: str, metric: str, recipe: RecipeGate) -> float:
    """A metric's own margin (e.g. bits_per_byte) wins; else the recipe's, else the family's.

    Margins never leak across metrics: an accuracy margin from a recipe never replaces bits/byte's.
    """
    base = metric.split(",")[0]
    if base in policy.metric_margins:
        return policy.metric_margins[base]
    if recipe.quality_margin is not None:
        return recipe.quality_margin
    return policy.margins[family]


def _exact(x: float) -> Fraction:
    """A float as the decimal it prints as (shortest round-trip repr), exactly: 0.02 is 1/50, not the binary
    0.0200000000000000004. Bounds and margins are compared as these fractions, so a bound sitting on the
    margin is a tie (neither pass nor fail) whatever rounding produced it."""
    return Fraction(repr(float(x)))


def _exceeds(worse: float, margin: float) -> bool:
    return _exact(worse) > _exact(margin)


def quality_check(task: str, comp: dict[str, Any], margin: float, min_items: int,
                  recovery_floor: float | None) -> Check:
    """Non-inferiority on one task's paired comparison (qgcore.stats.Comparison as a dict)."""
    hib = comp["higher_is_better"]
    lo, hi, d = comp["ci_low"], comp["ci_high"], comp["delta"]
    level = comp.get("level", 0.95)
    # Express everything as "how much worse", so one rule serves both metric directions.
    worse_best, worse_worst = (-hi, -lo) if hib else (lo, hi)
    nums = {"delta": d, "ci_low": lo, "ci_high": hi, "level": level, "ci_method": comp.get("ci_method"),
            "margin": margin, "n_items": comp["n_items"], "n_unmatched": comp.get("n_unmatched", 0),
            "recovery": comp.get("recovery"), "higher_is_better": hib}
    ci = f"delta {d:+.4f} ({level:.1%} CI {lo:+.4f}..{hi:+.4f}), margin {margin:.4f}, n={comp['n_items']}"
    unmatched = comp.get("n_unmatched", 0)
    if unmatched:
        return Check(f"quality:{task}", "inconclusive",
                     f"{task}: {unmatched} items scored by only one of bf16/variant: not a paired comparison; "
                     f"rerun eval for both; {ci}", nums)
    chance, base_low = comp.get("chance"), comp.get("baseline_ci_low")
    if chance is not None and base_low is not None and not base_low > chance:
        nums |= {"chance": chance, "baseline_ci_low": base_low, "recovery": None}
        return Check(f"quality:{task}", "inconclusive",
                     f"{task}: bf16 scores {comp.get('baseline', float('nan')):.3f} (CI low {base_low:.3f}), "
                     f"not above chance {chance:.3f}: this task decides nothing here", nums)
    rec = comp.get("recovery")
    low_recovery = recovery_floor is not None and rec is not None and rec < recovery_floor
    rec_txt = f"; recovery {rec:.1%} < floor {recovery_floor:.0%}" if low_recovery else ""
    if _exceeds(worse_best, margin):
        return Check(f"quality:{task}", "fail", f"{task}: worse than bf16 beyond the margin: {ci}{rec_txt}", nums)
    if comp["n_items"] < min_items:
        return Check(f"quality:{task}", "inconclusive",
                     f"{task}: only {comp['n_items']} items (< {min_items}): too few to show non-inferiority; "
                     f"{ci}{rec_txt}", nums)
    if low_recovery and recovery_floor is not None:
        # Like the margin, the floor fails only when even the CI's best case is below it: near-chance
        # baselines make the point estimate of a ratio swing with a single flipped item.
        best = _best_recovery(comp)
        if best is not None and best < recovery_floor:
            return Check(f"quality:{task}", "fail",
                         f"{task}: recovery {rec:.1%} (at best {best:.1%}) < floor {recovery_floor:.0%}; {ci}", nums)
        return Check(f"quality:{task}", "inconclusive",
                     f"{task}: recovery {rec:.1%} < floor {recovery_floor:.0%}, but the CI reaches the floor; {ci}",
                     nums)
    if _exact(worse_worst) < _exact(margin):  # strict: a bound sitting on the margin does not pass
        return Check(f"quality:{task}", "pass", f"{task}: non-inferior: {ci}", nums)
    return Check(f"quality:{task}", "inconclusive", f"{task}: CI too wide to decide: {ci}", nums)


def _best_recovery(comp: dict[str, Any]) -> float | None:
    base = comp.get("baseline")
    if not base:
        return None
    if comp["higher_is_better"]:
        return float((base + comp["ci_high"]) / base)
    worst_case_low = float(base + comp["ci_low"])
    return float(base / worst_case_low) if worst_case_low > 0 else None


def _quality(name: str, family: str, ev: dict[str, Any], policy: GatePolicy,
             recipe: RecipeGate) -> list[Check]:
    status = ev.get("status")
    if status is None:
        return [Check("quality:eval", "inconclusive", f"{name} has no eval.json: run `make eval`")]
    if status == "failed":
        why = ev.get("reason") or "no eval result"
        return [Check("quality:serve", "fail", f"{name} could not be served and scored: {why}")]
    if status == "unsupported" and ev.get("engine") != EMULATED:
        return [Check("quality:serve", "inconclusive", f"{ev.get('reason')}; rerun on hardware that has the kernels "
                      "or use --emulate-unsupported")]
    checks = []
    emulated = ev.get("engine") == EMULATED
    if emulated and not policy.allow_emulated:
        checks.append(Check("quality:engine", "inconclusive",
                            f"scores are {EMULATED}, not vLLM serving: cannot promote on emulation alone"))
    comps = ev.get("comparisons") or {}
    for task, tres in (ev.get("tasks") or {}).items():
        if tres.get("status") == "skipped":
            checks.append(Check(f"quality:{task}", "skipped", f"{task} skipped: {tres.get('reason')}"))
            continue
        if task not in comps:
            checks.append(Check(f"quality:{task}", "fail", f"{task}: no paired comparison with bf16"))
            continue
        comp = comps[task]
        margin = margin_for(policy, family, comp["metric"], recipe)
        floor = recipe.recovery_min if recipe.recovery_min is not None else policy.recovery_min.get(family)
        c = quality_check(task, comp, margin, policy.min_items, floor)
        if emulated:
            c = Check(c.name, c.outcome, f"{c.reason} [{EMULATED}]", c.numbers)
        checks.append(c)
    if not any(c.name.startswith("quality:") and c.outcome != "skipped" and c.name != "quality:engine"
               for c in checks):
        checks.append(Check("quality:tasks", "inconclusive", "no task was scored: nothing shows quality"))
    return checks


def _perf(bench: dict[str, Any] | None, base_bench: dict[str, Any] | None, policy: GatePolicy) -> list[Check]:
    if bench is None:
        return [Check("performance:bench", "inconclusive", "no bench.json: run `make bench`")]
    if bench.get("status") not in ("ok",):
        outcome: Outcome = "inconclusive" if bench.get("status") == "unsupported" else "fail"
        return [Check("performance:bench", outcome, f"bench {bench.get('status')}: {bench.get('reason')}")]
    checks = []
    point = bench.get("slo_point")
    slo = bench.get("slo", {})
    slo_txt = f"TTFT p95 <= {slo.get('ttft_p95_s')} s, ITL p95 <= {slo.get('itl_p95_ms')} ms"
    if policy.require_slo:
        if point is None:
            checks.append(Check("performance:latency_slo", "fail", f"no concurrency level meets the SLO ({slo_txt})"))
        else:
            checks.append(Check("performance:latency_slo", "pass",
                                f"meets the SLO ({slo_txt}) up to concurrency {point['concurrency']}",
                                {"concurrency": point["concurrency"]}))
    if policy.throughput_floor_vs_bf16 is not None:
        base_point = (base_bench or {}).get("slo_point")
        if point is None or base_point is None:
            who = "variant" if point is None else "bf16"
            checks.append(Check("performance:throughput", "fail" if point is None else "inconclusive",
                                f"no SLO point for {who}: throughput at the SLO cannot be compared"))
        else:
            ratio = point["output_tokens_per_s"] / base_point["output_tokens_per_s"]
            floor = policy.throughput_floor_vs_bf16
            txt = (f"{point['output_tokens_per_s']:.1f} tok/s at c={point['concurrency']} vs bf16 "
                   f"{base_point['output_tokens_per_s']:.1f} tok/s at c={base_point['concurrency']} "
                   f"= {ratio:.2f}x (floor {floor:.2f}x)")
            checks.append(Check("performance:throughput", "pass" if ratio >= floor else "fail", txt,
                                {"ratio": ratio, "floor": floor}))
    if policy.max_memory_bytes is not None:
        mem = bench.get("memory", {})
        peak = mem.get("server_gpu_bytes_peak") or mem.get("server_rss_bytes_peak")
        if peak is None:
            checks.append(Check("memory:cap", "inconclusive", "no memory measurement"))
        else:
            ok = peak <= policy.max_memory_bytes
            checks.append(Check("memory:cap", "pass" if ok else "fail",
                                f"peak {peak / 2**30:.2f} GiB ({mem.get('kind')}) vs cap "
                                f"{policy.max_memory_bytes / 2**30:.2f} GiB", {"peak_bytes": peak}))
    return checks


def divergence_checks(div: dict[str, Any] | None, family: str, policy: GatePolicy) -> list[Check]:
    """Caps on divergence from bf16 where the policy sets them; otherwise a note with the numbers (deciding
    nothing: KL says how different, not how much worse)."""
    cap, floor = policy.kl_p99_max.get(family), policy.top1_min.get(family)
    if div is None or div.get("status") != "ok":
        why = "no divergence.json (eval ran with --divergence-docs 0)" if div is None else \
            f"divergence {div.get('status')}: {div.get('reason')}"
        if cap is None and floor is None:
            return [Check("divergence", "skipped", f"{why}; diagnostic only (no cap in the policy)")]
        return [Check("divergence", "inconclusive", f"{why}; the policy caps divergence for {family}: rerun eval "
                      "with --divergence-docs N")]
    o = div.get("overall", {})
    kl99, top1 = float(o["kl_p99"]), float(o["top1_agreement"])
    nums = {"kl_mean": o.get("kl_mean"), "kl_p99": kl99, "top1_agreement": top1, "n_tokens": o.get("n_tokens"),
            "engine": div.get("engine"), "kl_p99_max": cap, "top1_min": floor}
    txt = (f"KL from bf16 mean {o.get('kl_mean', float('nan')):.4f}, p99 {kl99:.4f} nats; top-1 agreement "
           f"{top1:.3f} over {o.get('n_tokens')} tokens ({div.get('engine')})")
    if cap is None and floor is None:
        return [Check("divergence", "skipped", f"{txt}; diagnostic only (no cap in the policy)", nums)]
    checks = []
    if cap is not None:
        bad = _exact(kl99) > _exact(cap)
        checks.append(Check("divergence:kl_p99", "fail" if bad else "pass",
                            f"{txt}; p99 {'above' if bad else 'within'} the cap {cap} for {family}", nums))
    if floor is not None:
        bad = _exact(top1) < _exact(floor)
        checks.append(Check("divergence:top1", "fail" if bad else "pass",
                            f"{txt}; top-1 agreement {'below' if bad else 'at or above'} {floor} for {family}", nums))
    return checks


def decide_variant(name: str, family: str, ev: dict[str, Any] | None, bench: dict[str, Any] | None,
                   base_bench: dict[str, Any] | None, policy: GatePolicy, recipe: RecipeGate | None = None,
                   bytes_on_disk: int | None = None, div: dict[str, Any] | None = None) -> Decision:
    """One variant's verdict and every check behind it. `ev["comparisons"]` must be at the family-wise level."""
    checks = _quality(name, family, ev or {}, policy, recipe or RecipeGate()) + _perf(bench, base_bench, policy)
    checks += divergence_checks(div, family, policy)
    outcomes = {c.outcome for c in checks}
    verdict: Verdict = "reject" if "fail" in outcomes else "inconclusive" if "inconclusive" in outcomes else "promote"
    point = (bench or {}).get("slo_point") or {}
    return Decision(name, verdict, checks, point.get("usd_per_1m_output_tokens"), bytes_on_disk)


def recommend(decisions: list[Decision]) -> Decision | None:
    """The cheapest promoted variant: lowest $/1M output tokens at its SLO point, then fewest bytes."""
    ok = [d for d in decisions if d.verdict == "promote"]
    if not ok:
        return None
    return min(ok, key=lambda d: (d.cost_per_1m if d.cost_per_1m is not None else float("inf"),
                                  d.bytes_on_disk or 0, d.variant))
