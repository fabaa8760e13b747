"""The gate's decisions on evidence computed by the project's own comparison engine (qgcore.stats.compare):
no hand-written intervals, so a test fails when the engine and the gate stop agreeing."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from qgcore.stats import compare, level_key
from reports.gate import CHECKS, Evidence, GatePolicy, anchor, decide, quality_p_value, quality_task_check, recommend
from reports.policy import load_policy

BASE = load_policy()
Q = BASE.quality


def policy(**quality) -> GatePolicy:
    """The shipped policy with quality fields replaced (and no SLO/throughput check unless a bench is given)."""
    sections = dict(BASE.sections)
    sections["quality"] = replace(Q, **quality)
    return GatePolicy(sections)


def binary_items(n: int, acc: float, down: int, up: int, seed: int = 0) -> tuple[dict, dict]:
    """Reference/variant 0/1 items: the reference right on round(acc*n), then `down` right->wrong flips and
    `up` wrong->right flips for the variant."""
    rng = random.Random(seed)
    right = round(acc * n)
    ref = [1] * right + [0] * (n - right)
    var = list(ref)
    for i in range(down):
        var[i] = 0
    for i in range(up):
        var[right + i] = 1
    ids = [f"d{i:05d}" for i in range(n)]
    rng.shuffle(ids)
    return ({i: (float(r), 1.0) for i, r in zip(ids, ref, strict=True)},
            {i: (float(v), 1.0) for i, v in zip(ids, var, strict=True)})


def comparison(ref, var, *, margin=0.02, levels=(0.05,), floor=None, chance=None, binary=True, hib=True) -> dict:
    return compare(ref, var, metric="acc,none" if binary else "bits_per_byte,none", higher_is_better=hib,
                   margin=margin, binary=binary, levels=levels, floor=floor, chance=chance, n_boot=2000).to_dict()


def task_result(items: dict, *, binary=True, hib=True, chance=None) -> dict:
    return {"status": "scored", "items": {k: list(v) for k, v in items.items()}, "binary": binary,
            "higher_is_better": hib, "metric": "acc,none" if binary else "bits_per_byte,none", "chance": chance}


def evidence(name: str, comps: dict, *, family="8bit", status="served", engine="vllm", bench=None, ref_bench=None,
             divergence=None, size=1000) -> Evidence:
    tasks = {t: {"status": "scored"} for t in comps}
    run = {"status": status, "engine": engine, "reason": None, "tasks": tasks}
    ref_run = {"status": "served", "engine": engine, "tasks": {t: {"status": "scored"} for t in comps}}
    from qgcore.quality import RecipeGate

    return Evidence(name, family, "bf16", RecipeGate(), run, ref_run, comps, bench, ref_bench, divergence, size)


# ---- one task ------------------------------------------------------------------------------------------

def test_no_flips_on_enough_items_is_non_inferior_and_the_bound_clears_the_margin():
    ref, var = binary_items(1000, 0.6, 0, 0)
    c = comparison(ref, var)
    check = quality_task_check("t", c, Q, 0.05)
    assert check.outcome == "pass"
    assert check.numbers["ci_low"] > -0.02 and c["p_noninferior"] < 0.05


def test_a_loss_well_beyond_the_margin_fails_and_says_so():
    ref, var = binary_items(1000, 0.6, 80, 0)  # 8 points lost vs a 2-point margin
    check = quality_task_check("t", comparison(ref, var), Q, 0.05)
    assert check.outcome == "fail" and "beyond the margin" in check.reason
    assert check.numbers["ci_high"] < -0.02


def test_a_loss_near_the_margin_is_inconclusive_not_a_pass():
    ref, var = binary_items(1000, 0.6, 40, 20)  # delta -0.02, exactly at the margin
    check = quality_task_check("t", comparison(ref, var), Q, 0.05)
    assert check.outcome == "inconclusive" and "too wide" in check.reason
    assert check.numbers["ci_low"] < -0.02 < check.numbers["ci_high"]


def test_too_few_items_decide_nothing_even_with_a_tight_interval():
    ref, var = binary_items(60, 0.6, 0, 0)
    check = quality_task_check("t", comparison(ref, var, margin=0.2), Q, 0.05)
    assert check.outcome == "inconclusive" and "too few" in check.reason


def test_unpaired_items_make_the_task_inconclusive():
    ref, var = binary_items(500, 0.6, 0, 0)
    var.pop(next(iter(var)))
    c = comparison(ref, var)
    assert c["n_unmatched"] == 1
    check = quality_task_check("t", c, Q, 0.05)
    assert check.outcome == "inconclusive" and "not a paired comparison" in check.reason
    ev = evidence("fp8", {"t": c})
    assert quality_p_value(ev, Q) == 1.0


def test_a_reference_not_shown_above_chance_decides_nothing():
    ref, var = binary_items(400, 0.27, 0, 0)  # 4 choices: 27% is not shown above 25%
    c = comparison(ref, var, chance=0.25)
    check = quality_task_check("t", c, Q, 0.05)
    assert check.outcome == "inconclusive" and "not shown above chance" in check.reason
    assert quality_p_value(evidence("fp8", {"t": c}), Q) >= c["p_above_chance"] > 0.05


def test_lower_is_better_metric_direction_on_the_bootstrap():
    rng = random.Random(3)
    ids = [f"doc{i}" for i in range(700)]  # above min_items.continuous (600)
    ref = {i: (rng.uniform(300, 500), 400.0) for i in ids}  # bits, bytes: ~1 bit/byte
    small = {i: (v[0] * 1.005, v[1]) for i, v in ref.items()}  # +0.5%: well within 0.03 bpb
    big = {i: (v[0] * 1.08, v[1]) for i, v in ref.items()}  # +8%: ~0.08 bpb worse
    ok = quality_task_check("p", comparison(ref, small, margin=0.03, binary=False, hib=False), Q, 0.05)
    bad = quality_task_check("p", comparison(ref, big, margin=0.03, binary=False, hib=False), Q, 0.05)
    assert ok.outcome == "pass" and bad.outcome == "fail"
    assert ok.numbers["ci_high"] < 0.03 < bad.numbers["ci_low"]


def test_the_recovery_floor_only_rejects():
    # 10 points lost of a 50% baseline: 80% recovery, shown below a 90% floor: fail (margin 0.15 would pass)
    ref, var = binary_items(1000, 0.5, 100, 0)
    c = comparison(ref, var, margin=0.15, floor=0.9)
    check = quality_task_check("t", c, Q, 0.05)
    assert check.outcome == "fail" and "shown below the floor" in check.reason
    # a few flips on a small baseline: point recovery under the floor, not shown below it -> the margin decides
    ref, var = binary_items(300, 0.2, 4, 0)
    c = comparison(ref, var, margin=0.05, floor=0.97)
    assert c["recovery"] < 0.97 and c["p_below_floor"] > 0.05
    assert quality_task_check("t", c, Q, 0.05).outcome == "pass"


@pytest.mark.parametrize("level", [0.05, 0.025, 0.0125])
def test_pass_is_exactly_p_below_level_and_implies_the_bound_clears_the_margin(level):
    """Across random tables the check, the p-value and the interval agree at every Holm level."""
    rng = random.Random(int(level * 1e4))
    seen = set()
    for _ in range(150):
        n = rng.choice([100, 150, 300, 600])
        down, up = rng.randint(0, 40), rng.randint(0, 30)
        ref, var = binary_items(n, 0.7, min(down, int(0.7 * n)), min(up, n - int(0.7 * n)))
        c = comparison(ref, var, margin=0.05, levels=(level,))
        check = quality_task_check("t", c, Q, level)
        seen.add(check.outcome)
        assert (check.outcome == "pass") == (c["p_noninferior"] < level)
        lo, hi = c["intervals"][level_key(level)]
        if check.outcome == "pass":
            assert lo > -0.05
        if check.outcome == "fail":
            assert hi < -0.05
    assert {"pass", "fail", "inconclusive"} <= seen


# ---- the variant and the family --------------------------------------------------------------------------

def _good(seed=0, n=1000):
    return comparison(*binary_items(n, 0.6, 0, 0, seed), levels=Q.levels(3))


def test_variant_p_value_is_the_largest_over_its_tasks_and_a_failed_task_fails_it():
    ref, var = binary_items(1000, 0.6, 15, 5)
    mixed = {"a": _good(), "b": comparison(ref, var, levels=Q.levels(3))}
    ev = evidence("fp8", mixed)
    assert quality_p_value(ev, Q) == max(c["p_noninferior"] for c in mixed.values())
    broken = replace(ev, eval=ev.eval | {"tasks": {"a": {"status": "scored"}, "b": {"status": "failed:scoring",
                                                                                       "reason": "HTTP 500"}}})
    assert quality_p_value(broken, Q) == 1.0
    [d] = decide({"fp8": broken}, policy(), k=1)
    assert d.verdict == "reject" and any(c.name == "quality:b" and c.outcome == "fail" for c in d.checks)


def _quality_only() -> GatePolicy:
    sections = dict(BASE.sections)
    perf = CHECKS["performance"].section
    sections["performance"] = perf(throughput_margin=None, require_slo=False)
    return GatePolicy(sections)


def _with_p(target: float, n: int = 2000) -> dict:
    """A binary comparison whose non-inferiority p-value is close to `target` (searching the flip count)."""
    best = None
    for down in range(0, 200):
        c = comparison(*binary_items(n, 0.6, down, 0), levels=Q.levels(3))
        if best is None or abs(c["p_noninferior"] - target) < abs(best["p_noninferior"] - target):
            best = c
    return best


def test_holm_steps_down_over_the_declared_family():
    pol = _quality_only()
    p1, p2 = _with_p(0.012), _with_p(0.035)
    assert p1["p_noninferior"] < 0.05 / 3 and 0.025 < p2["p_noninferior"] < 0.05
    evs = {"a": evidence("a", {"t": p1}), "b": evidence("b", {"t": p2})}
    # k = 2 declared: a at 0.025 passes, then b at 0.05 passes
    got = {d.variant: d for d in decide(evs, pol, k=2)}
    assert got["a"].level == 0.025 and got["b"].level == 0.05
    assert got["a"].verdict == got["b"].verdict == "promote"
    # k = 3 (one declared variant absent counts as p = 1): a at 0.05/3, b at 0.025 -> b is not shown
    got = {d.variant: d for d in decide(evs, pol, k=3)}
    assert got["a"].level == pytest.approx(0.05 / 3) and got["a"].verdict == "promote"
    assert got["b"].level == 0.025 and got["b"].verdict == "inconclusive"


def test_holm_stops_at_the_first_failure():
    pol = _quality_only()
    evs = {"a": evidence("a", {"t": _with_p(0.03)}), "b": evidence("b", {"t": _with_p(0.01)})}
    got = {d.variant: d for d in decide(evs, pol, k=3)}  # b at 0.0167 passes, a at 0.025 fails: stays there
    assert got["b"].verdict == "promote" and got["a"].verdict == "inconclusive"
    assert got["a"].level == 0.025


def test_emulated_scores_cannot_promote_unless_the_policy_allows_it():
    ev = evidence("gptq", {"t": _good()}, family="4bit", status="emulated", engine="emulated (transformers)")
    [d] = decide({"gptq": ev}, _quality_only(), k=1)
    assert d.verdict == "inconclusive" and any(c.name == "quality:engine" for c in d.checks)
    sections = dict(_quality_only().sections) | {"quality": replace(Q, allow_emulated=True)}
    [d] = decide({"gptq": ev}, GatePolicy(sections), k=1)
    assert d.verdict == "promote" and all("[emulated" in c.reason for c in d.checks if c.name.startswith("quality:t"))


@pytest.mark.parametrize(("status", "verdict"), [("unsupported", "inconclusive"), ("failed:start", "reject"),
                                                 ("failed:checkpoint", "reject")])
def test_a_variant_that_was_not_scored(status, verdict):
    ev = evidence("x", {}, status=status)
    [d] = decide({"x": replace(ev, eval=ev.eval | {"reason": "why"})}, _quality_only(), k=1)
    assert d.verdict == verdict and d.p_value == 1.0


# ---- performance, memory, divergence -----------------------------------------------------------------------

def _bench(load, ratio=None, cost=0.5, need=None):
    cap = {"load": load, "load_kind": "concurrency", "usd_per_1m_output_tokens": cost} if load else {}
    return {"status": "served", "capacity": cap, "slo": {"ttft_p95_s": 2, "itl_p95_ms": 100},
            "throughput_vs_reference": ratio, "memory": {"need_bytes": need, "need_source": "vLLM KV + weights"}}


@pytest.mark.parametrize(("low", "high", "outcome"), [(0.97, 1.10, "pass"), (0.80, 0.90, "fail"),
                                                       (0.90, 1.05, "inconclusive")])
def test_throughput_is_non_inferiority_on_the_ratio_interval(low, high, outcome):
    ratio = {"ratio": (low + high) / 2, "low": low, "high": high, "level": 0.9, "pairs": 5}
    ev = evidence("fp8", {"t": _good()}, bench=_bench(8, ratio), ref_bench=_bench(8))
    [d] = decide({"fp8": ev}, BASE, k=1)
    [c] = [c for c in d.checks if c.name == "performance:throughput"]
    assert c.outcome == outcome and c.numbers["floor"] == pytest.approx(0.95)


def test_no_load_meeting_the_slo_fails_when_the_policy_requires_it():
    ev = evidence("fp8", {"t": _good()}, bench=_bench(None), ref_bench=_bench(8))
    [d] = decide({"fp8": ev}, BASE, k=1)
    assert d.verdict == "reject"
    assert {c.name for c in d.checks if c.outcome == "fail"} == {"performance:latency_slo", "performance:throughput"}


def test_memory_cap():
    ratio = {"ratio": 1.1, "low": 1.0, "high": 1.2, "level": 0.9, "pairs": 5}
    mem = CHECKS["memory"].section
    for need, outcome in ((3 * 2**30, "pass"), (5 * 2**30, "fail"), (None, "inconclusive")):
        ev = evidence("fp8", {"t": _good()}, bench=_bench(8, ratio, need=need), ref_bench=_bench(8))
        [c] = CHECKS["memory"].run(ev, mem(max_gib=4.0), 0.05)
        assert c.outcome == outcome


def test_divergence_is_diagnostic_unless_capped():
    div = {"status": "measured", "engine": "vllm", "overall": {"kl_mean": 0.1, "kl_p99": 0.9, "top1_agreement": 0.8,
                                                                "n_tokens": 4096}}
    ev = evidence("fp8", {"t": _good()}, divergence=div)
    section = CHECKS["divergence"].section
    [c] = CHECKS["divergence"].run(ev, BASE["divergence"], 0.05)
    assert c.outcome == "skipped" and "diagnostic only" in c.reason
    capped = section(kl_p99_max={"8bit": 0.5, "4bit": None}, top1_min={"8bit": 0.9, "4bit": None})
    outcomes = {c.name: c.outcome for c in CHECKS["divergence"].run(ev, capped, 0.05)}
    assert outcomes == {"divergence:kl_p99": "fail", "divergence:top1": "fail"}
    missing = CHECKS["divergence"].run(replace(ev, divergence=None), capped, 0.05)
    assert [c.outcome for c in missing] == ["inconclusive"]


def test_recommend_picks_the_cheapest_promoted_variant():
    ratio = {"ratio": 1.1, "low": 1.0, "high": 1.2, "level": 0.9, "pairs": 5}
    evs = {"fp8": evidence("fp8", {"t": _good()}, bench=_bench(8, ratio, cost=0.40), ref_bench=_bench(8)),
           "awq": evidence("awq", {"t": _good(1)}, family="4bit", bench=_bench(8, ratio, cost=0.30),
                           ref_bench=_bench(8)),
           "bad": evidence("bad", {"t": comparison(*binary_items(1000, 0.6, 200, 0), levels=Q.levels(3))},
                           bench=_bench(8, ratio, cost=0.10), ref_bench=_bench(8))}
    decisions = decide(evs, BASE, k=3)
    assert {d.variant: d.verdict for d in decisions} == {"fp8": "promote", "awq": "promote", "bad": "reject"}
    assert recommend(decisions).variant == "awq"
    assert recommend([d for d in decisions if d.variant == "bad"]) is None


def test_every_check_name_anchors_into_the_report():
    assert anchor("quality:mmlu", "fp8") == "#task-mmlu"
    assert anchor("quality:serve", "fp8") == "#quality"
    assert anchor("performance:throughput", "fp8") == "#bench-fp8"
    assert anchor("memory:cap", "fp8") == "#memory"
    assert anchor("unknown", "fp8") == "#verdict-table"
    assert set(CHECKS) == {"quality", "performance", "memory", "divergence"}
