from dataclasses import replace

from reports.gate import RecipeGate, decide_variant, margin_for, quality_check, recommend
from reports.policy import load_policy

POLICY = replace(load_policy(), recovery_min={})  # the shipped defaults, without recovery floors


def comp(delta, lo, hi, n=500, hib=True, recovery=1.0, metric="acc,none", **extra):
    return {"metric": metric, "higher_is_better": hib, "delta": delta, "ci_low": lo, "ci_high": hi, "n_items": n,
            "recovery": recovery, "level": 0.95, "n_unmatched": 0} | extra


def test_non_inferior_when_whole_ci_above_minus_margin():
    assert quality_check("t", comp(-0.005, -0.015, 0.005), 0.02, 100, None).outcome == "pass"


def test_reject_when_whole_ci_below_minus_margin():
    c = quality_check("t", comp(-0.08, -0.10, -0.03), 0.02, 100, None)
    assert c.outcome == "fail" and "beyond the margin" in c.reason


def test_inconclusive_when_ci_straddles_margin():
    c = quality_check("t", comp(-0.01, -0.04, 0.02), 0.02, 100, None)
    assert c.outcome == "inconclusive" and "too wide" in c.reason


def test_inconclusive_with_few_items_even_if_ci_is_tight():
    c = quality_check("t", comp(0.0, 0.0, 0.0, n=20), 0.02, 100, None)
    assert c.outcome == "inconclusive" and "too few" in c.reason


def test_lower_is_better_metric_direction():
    # bits per byte went up by 0.01..0.02: within a 0.03 margin -> pass; 0.04..0.06 -> fail
    assert quality_check("p", comp(0.015, 0.01, 0.02, hib=False), 0.03, 100, None).outcome == "pass"
    assert quality_check("p", comp(0.05, 0.04, 0.06, hib=False), 0.03, 100, None).outcome == "fail"


def test_recovery_floor_fails_only_when_the_whole_ci_is_below_it():
    # base 0.5, delta -0.05 (CI -0.06..-0.04): recovery 90%, at best 92% < 97% floor -> fail
    sure = comp(-0.05, -0.06, -0.04, recovery=0.9) | {"baseline": 0.5}
    c = quality_check("t", sure, 0.1, 100, 0.97)
    assert c.outcome == "fail" and "recovery 90.0% (at best 92.0%)" in c.reason
    # one flip on a near-chance baseline: point recovery 96% but the CI reaches 100% -> inconclusive
    noisy = comp(-0.0067, -0.0267, 0.0, recovery=0.964) | {"baseline": 0.1867}
    c = quality_check("t", noisy, 0.05, 100, 0.97)
    assert c.outcome == "inconclusive" and "CI reaches the floor" in c.reason


def _ev(comps, engine="vllm", status="ok"):
    return {"status": status, "engine": engine, "reason": None,
            "tasks": {t: {"status": "ok"} for t in comps} | {"mmlu_pro": {"status": "skipped", "reason": "offline"}},
            "comparisons": comps}


def _bench(tps, cost, meets=True):
    point = {"concurrency": 8, "output_tokens_per_s": tps, "usd_per_1m_output_tokens": cost} if meets else None
    return {"status": "ok", "slo_point": point, "slo": {"ttft_p95_s": 3, "itl_p95_ms": 50}, "memory": {}}


def test_decide_promote_and_reasons_have_numbers():
    d = decide_variant("fp8", "8bit", _ev({"mmlu": comp(-0.002, -0.01, 0.006)}), _bench(120, 0.5), _bench(100, 0.7),
                       POLICY)
    assert d.verdict == "promote"
    assert any("1.20x" in c.reason for c in d.checks)
    assert any(c.outcome == "skipped" and "mmlu_pro" in c.name for c in d.checks)  # noted, decides nothing


def test_decide_reject_on_throughput_below_bf16():
    d = decide_variant("gptq", "4bit", _ev({"mmlu": comp(0.0, -0.01, 0.01)}), _bench(80, 1.0), _bench(100, 0.7),
                       POLICY)
    assert d.verdict == "reject"
    assert [c.name for c in d.checks if c.outcome == "fail"] == ["performance:throughput"]


def test_decide_reject_when_slo_never_met():
    d = decide_variant("x", "4bit", _ev({"m": comp(0.0, -0.01, 0.01)}), _bench(0, None, meets=False),
                       _bench(100, 0.7), POLICY)
    assert d.verdict == "reject" and any("SLO" in c.reason for c in d.checks if c.outcome == "fail")


def test_emulated_scores_cannot_promote():
    d = decide_variant("nvfp4", "4bit", _ev({"m": comp(0.0, -0.005, 0.005)}, engine="emulated (transformers)"),
                       _bench(120, 0.5), _bench(100, 0.7), POLICY)
    assert d.verdict == "inconclusive"
    assert any("emulated (transformers)" in c.reason for c in d.checks)


def test_unsupported_and_failed_variants():
    unsup = decide_variant("nvfp4", "4bit", {"status": "unsupported", "reason": "unsupported here: no kernel"}, None,
                           None, POLICY)
    assert unsup.verdict == "inconclusive"
    failed = decide_variant("x", "4bit", {"status": "failed", "reason": "vLLM died"}, None, None, POLICY)
    assert failed.verdict == "reject" and "vLLM died" in failed.checks[0].reason


def test_recommend_cheapest_promoted():
    ok = decide_variant("a", "8bit", _ev({"m": comp(0, -0.01, 0.01)}), _bench(120, 0.50), _bench(100, 0.7), POLICY)
    cheaper = decide_variant("b", "4bit", _ev({"m": comp(0, -0.01, 0.01)}), _bench(150, 0.40), _bench(100, 0.7),
                             POLICY)
    rejected = decide_variant("c", "4bit", _ev({"m": comp(-0.2, -0.3, -0.1)}), _bench(300, 0.1), _bench(100, 0.7),
                              POLICY)
    assert recommend([ok, cheaper, rejected]).variant == "b"
    assert recommend([rejected]) is None


def test_a_bound_exactly_on_the_margin_does_not_pass():
    # 150 items, margin 0.02: n*margin = 3 is whole; a bound of exactly -3/150 must not pass (strict), and a
    # float that rounds differently from the decimal margin must not flip the decision either.
    on = comp(0.0, -3 / 150, 0.01, n=150)
    assert quality_check("t", on, 0.02, 100, None).outcome == "inconclusive"
    assert quality_check("t", comp(0.0, -0.02, 0.01), 0.02, 100, None).outcome == "inconclusive"
    assert quality_check("t", comp(0.0, -0.019999999, 0.01), 0.02, 100, None).outcome == "pass"
    # fail side: best case exactly at the margin is not "beyond" it
    assert quality_check("t", comp(-0.05, -0.08, -0.02), 0.02, 100, None).outcome == "inconclusive"


def test_unpaired_items_make_the_task_inconclusive_with_the_count():
    c = quality_check("t", comp(0.0, -0.005, 0.005, n_unmatched=7), 0.02, 100, None)
    assert c.outcome == "inconclusive" and "7 items scored by only one" in c.reason


def test_a_task_at_chance_decides_nothing():
    at_chance = comp(0.053, 0.0, 0.1, n=150, recovery=1.22, chance=0.25, baseline_ci_low=0.18, baseline=0.24)
    c = quality_check("mc", at_chance, 0.05, 100, 0.9)
    assert c.outcome == "inconclusive" and "not above chance 0.250" in c.reason
    assert c.numbers["recovery"] is None
    above = comp(0.0, -0.01, 0.01, chance=0.25, baseline_ci_low=0.6, baseline=0.65)
    assert quality_check("mc", above, 0.05, 100, 0.9).outcome == "pass"


def test_margins_never_leak_across_metrics():
    policy = replace(load_policy(), metric_margins={"bits_per_byte": 0.03})
    recipe = RecipeGate(quality_margin=0.10)
    assert margin_for(policy, "4bit", "acc_norm,none", recipe) == 0.10
    assert margin_for(policy, "4bit", "bits_per_byte,none", recipe) == 0.03  # the recipe's accuracy margin stays out
    assert margin_for(policy, "4bit", "acc,none", RecipeGate()) == 0.05


def test_recipe_recovery_floor_is_used():
    ev = _ev({"m": comp(-0.04, -0.045, -0.03, recovery=0.92) | {"baseline": 0.5}})
    loose = decide_variant("x", "4bit", ev, _bench(120, 0.5), _bench(100, 0.7), POLICY)
    strict = decide_variant("x", "4bit", ev, _bench(120, 0.5), _bench(100, 0.7), POLICY,
                            RecipeGate(recovery_min=0.97))
    assert loose.verdict == "promote"
    assert strict.verdict == "reject" and any("floor 97%" in c.reason for c in strict.checks)


def _div(kl99, top1, status="ok"):
    return {"status": status, "engine": "vllm", "reason": None if status == "ok" else "server died",
            "overall": {"kl_mean": kl99 / 5, "kl_p99": kl99, "top1_agreement": top1, "n_tokens": 8184}}


def test_divergence_is_a_note_unless_the_policy_caps_it():
    good = _ev({"mmlu": comp(-0.002, -0.01, 0.006)})
    d = decide_variant("fp8", "8bit", good, _bench(120, 0.5), _bench(100, 0.7), POLICY, div=_div(3.0, 0.5))
    note = next(c for c in d.checks if c.name == "divergence")
    assert d.verdict == "promote" and note.outcome == "skipped" and "diagnostic only" in note.reason
    assert note.numbers["kl_p99"] == 3.0


def test_divergence_caps_reject_grossly_broken_variants_with_numbers():
    capped = replace(POLICY, kl_p99_max={"8bit": 0.5}, top1_min={"8bit": 0.9})
    good = _ev({"mmlu": comp(-0.002, -0.01, 0.006)})
    d = decide_variant("fp8", "8bit", good, _bench(120, 0.5), _bench(100, 0.7), capped, div=_div(3.0, 0.95))
    kl = next(c for c in d.checks if c.name == "divergence:kl_p99")
    assert d.verdict == "reject" and kl.outcome == "fail" and "3.0000" in kl.reason and "cap 0.5" in kl.reason
    assert next(c for c in d.checks if c.name == "divergence:top1").outcome == "pass"
    d = decide_variant("fp8", "8bit", good, _bench(120, 0.5), _bench(100, 0.7), capped, div=_div(0.5, 0.9))
    assert d.verdict == "promote"  # on the cap and on the floor: within (compared exactly)
    d = decide_variant("fp8", "8bit", good, _bench(120, 0.5), _bench(100, 0.7), capped, div=_div(0.1, 0.89))
    assert d.verdict == "reject" and "below 0.9" in next(c.reason for c in d.checks if c.name == "divergence:top1")
    # a cap the evidence cannot answer is inconclusive, never a pass; a family without a cap is not held to it
    d = decide_variant("fp8", "8bit", good, _bench(120, 0.5), _bench(100, 0.7), capped, div=None)
    assert d.verdict == "inconclusive" and "--divergence-docs" in d.checks[-1].reason
    d = decide_variant("gptq", "4bit", good, _bench(120, 0.5), _bench(100, 0.7), capped, div=_div(9.0, 0.1))
    assert d.verdict == "promote"
