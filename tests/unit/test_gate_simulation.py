"""The gate's one promise, checked through its own code (qgcore.stats + reports.gate, as `make bench-gate`).

The promise: a run promotes a variant whose true loss on a task is at its margin with probability at most
`quality.alpha` (0.05), whatever its declared family size. Accuracy is checked *exactly* (every paired
table with mass above 1e-11 at a true delta of -margin, decided by the real gate check) at every one-sided
level Holm may use for the shipped recipe set and every item count the tool scores; bits/byte, Holm and the
group-sequential design by simulation with enough runs that a rate of 1.2 x the level would fail.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import qgcore.stats as stats
from qgcore.quality import QualityPolicy
from quantgate.bench_gate import (
    DISAGREE,
    SIZES,
    AccuracyCell,
    accuracy_grid,
    bpb_promote_rate,
    bpb_promote_rates,
    exact_promote_rate,
    family_rate,
    gate_passes,
    sequential_run,
    simulated_promote_rate,
)
from quantize.recipe import load_recipes
from reports.gate import GatePolicy
from reports.policy import load_policy

POLICY = load_policy()
Q: QualityPolicy = POLICY.quality
ALPHA = Q.alpha


def _declared_k() -> int:
    """The shipped recipe set's variant count (the reference excluded): Holm's levels go down to alpha / k."""
    return sum(1 for r in load_recipes(None) if r.family != "reference")


LEVELS = Q.levels(_declared_k())


def test_one_alpha():
    """README, policy YAML and help text quote one number; the tests below hold the gate to it."""
    import re
    import subprocess
    import sys

    assert ALPHA == 0.05 and LEVELS[-1] == ALPHA and len(LEVELS) == _declared_k() >= 4
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    assert f"**One alpha: {ALPHA}.**" in readme
    quoted = {float(x) for x in re.findall(r"\balpha\b[^.\n]{0,40}?\b(0\.\d+)\b", readme)}
    assert quoted <= {ALPHA}, quoted  # no other value of alpha anywhere in the README
    yaml_text = (root / "reports" / "policy.default.yaml").read_text()
    assert re.search(rf"^  alpha: {ALPHA}$", yaml_text, re.M)
    helptext = subprocess.run([sys.executable, "-m", "quantgate.cli", "gate", "--help"], capture_output=True,
                              text=True, check=True, cwd=root).stdout
    assert f"quality.alpha {ALPHA} " in " ".join(helptext.split())


@pytest.fixture(scope="module")
def grid():
    return accuracy_grid(Q, LEVELS)


def test_exact_false_promotes_at_the_margin_stay_within_each_level(grid):
    feasible = [r for r in grid if r["rate"] is not None]
    assert {r["n"] for r in feasible} == set(SIZES) and {r["d"] for r in feasible} == set(DISAGREE)
    assert {r["level"] for r in feasible} == set(LEVELS)
    for level in LEVELS:
        worst = max((r for r in feasible if r["level"] == level), key=lambda r: r["rate"])
        assert worst["rate"] <= level, worst
    # and not vacuously: the worst cell uses a good part of the level
    assert max(r["rate"] / r["level"] for r in feasible) > 0.6


def test_the_enumeration_would_catch_a_liberal_test(monkeypatch):
    """Power of the check itself: the uncalibrated score test (factor 1) and a 30% too liberal one break
    the bound somewhere on the grid."""
    monkeypatch.setattr(stats, "TANGO_FACTOR", 1.3)
    rows = accuracy_grid(Q, [ALPHA], sizes=(100, 150, 200))
    assert max(r["rate"] for r in rows if r["rate"] is not None) > ALPHA


def test_exact_rate_equals_a_simulation_of_the_same_cell():
    """The enumeration is what a multinomial simulation of the real gate gives (no chance rate, no floor)."""
    cell = AccuracyCell(0.02, 273, 0.10, 0.6, -0.02)
    exact = exact_promote_rate(cell, ALPHA, Q)
    sim = simulated_promote_rate(cell, ALPHA, Q, 40_000, seed=5, chance=None)
    assert abs(exact - sim) < 4 * np.sqrt(exact * (1 - exact) / 40_000) + 1e-4


@pytest.mark.parametrize("margin", [0.02, 0.05])
def test_more_right_to_wrong_never_helps(margin):
    """What lets the enumeration walk the pass region's boundary: for fixed wrong->right the real decision
    is monotone in right->wrong (every table with up to 30 discordant pairs each way at n = 150)."""
    for up in range(0, 31):
        decisions = [gate_passes(150 - up - down - (150 - up - down) // 2, down, up, (150 - up - down) // 2,
                                 margin=margin, q=Q, level=ALPHA) for down in range(0, 31)]
        assert decisions == sorted(decisions, reverse=True), (up, decisions)


def test_chance_and_floor_only_take_promotions_away():
    """The real gate with the task's chance rate and the family floor on promotes at most what the
    enumeration (both off) counts, so the exact grid is the worst case of every configuration."""
    cell = AccuracyCell(0.05, 200, 0.10, 0.35, -0.05)
    off = exact_promote_rate(cell, ALPHA, Q)
    on = simulated_promote_rate(cell, ALPHA, Q, 20_000, seed=3, chance=0.25, floor=Q.recovery_min["4bit"])
    assert on <= off + 3 * np.sqrt(off / 20_000)


def test_the_floor_decides_on_the_interval_not_the_point():
    """A 4-bit variant 4 points down on MMLU-Pro-sized data (recovery 93% > the 90% floor, inside the 5-point
    margin) is promoted; a variant whose true recovery *is* the floor is failed by it in at most alpha of
    runs (rejection-only), and one clearly below it is failed."""
    floor = Q.recovery_min["4bit"]
    inside = AccuracyCell(0.05, 12032, 0.10, 0.6, -0.04)
    assert simulated_promote_rate(inside, ALPHA, Q, 400, seed=1, chance=0.1, floor=floor) > 0.95

    from qgcore.stats import binary_comparison, counts_common
    from reports.gate import quality_task_check

    def floor_fails(cell: AccuracyCell, runs: int, seed: int) -> float:
        probs = cell.probs()
        assert probs is not None
        out = 0
        for t in np.random.default_rng(seed).multinomial(cell.n, probs, size=runs):
            a, down, up, d = map(int, t)
            comp = binary_comparison(a, down, up, d, common=counts_common(a, down, up, d, metric="acc", margin=0.5),
                                     levels=[ALPHA], floor=floor)
            check = quality_task_check("t", comp.to_dict(), Q, ALPHA)
            out += check.outcome == "fail" and "floor" in check.reason
        return out / runs

    at_floor = AccuracyCell(0.05, 2000, 0.10, 0.5, -0.05)  # recovery 0.45 / 0.5 = 0.90 exactly
    assert floor_fails(at_floor, 4000, 2) <= ALPHA
    below = AccuracyCell(0.05, 2000, 0.12, 0.5, -0.10)  # recovery 80%
    assert floor_fails(below, 300, 4) > 0.95


def test_holm_keeps_the_familywise_rate_and_beats_bonferroni():
    """Four declared variants, decided together by reports.gate.decide: the chance that any variant at its
    margin is promoted stays within alpha; a lossless one is promoted more often under Holm."""
    runs = 2000
    holm = family_rate([-0.02] * 4, n=600, d=0.05, margin=0.02, policy=POLICY, runs=runs, seed=1)
    assert holm["familywise_false_promote"] <= ALPHA
    mixed = [-0.02, 0.0, 0.0, 0.0]
    h = family_rate(mixed, n=1000, d=0.05, margin=0.02, policy=POLICY, runs=runs, seed=2)
    bonf = GatePolicy(POLICY.sections | {"quality": replace(Q, multiplicity="bonferroni")})
    b = family_rate(mixed, n=1000, d=0.05, margin=0.02, policy=bonf, runs=runs, seed=2)
    assert h["familywise_false_promote"] <= ALPHA and b["familywise_false_promote"] <= ALPHA
    assert h["promote_v1"] >= b["promote_v1"] and h["promote_v1"] > 0.5


BPB_N = Q.min_items["continuous"]  # fewer documents decide nothing; the built-in task has exactly this many


def test_bits_per_byte_false_promotes_at_the_margin_at_every_holm_level():
    """BCa over documents, damage on every document but heavy-tailed (lognormal sigma 1.2: the worst shape at
    small levels), at the margin, 2000 runs each decided at every Holm level: a true rate of 1.2 x alpha would
    exceed alpha here with probability 0.97. `make test-slow` runs every shape at 6000 runs."""
    margin = Q.metric_margins["bits_per_byte"]
    rates = bpb_promote_rates(BPB_N, margin, margin, "lognormal", 2000, seed=BPB_N, q=Q, levels=LEVELS)
    assert all(rates[a] <= a for a in LEVELS), rates
    assert rates[ALPHA] > 0.2 * ALPHA  # not vacuous: the check does promote near the margin


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["concentrated", "lognormal", "catastrophic"])
@pytest.mark.parametrize("n", [BPB_N, 1000])
def test_bits_per_byte_false_promotes_every_shape(shape, n):
    margin = Q.metric_margins["bits_per_byte"]
    rates = bpb_promote_rates(n, margin, margin, shape, 6000, seed=n + 7, q=Q, levels=LEVELS)
    assert all(rates[a] <= a for a in LEVELS), rates


def test_too_few_documents_decide_nothing():
    """Below min_items a bits/byte task is inconclusive however clear it looks (heavy tails hide there)."""
    margin = Q.metric_margins["bits_per_byte"]
    assert bpb_promote_rates(BPB_N - 1, margin, 0.0, "lognormal", 20, seed=2, q=Q, levels=[ALPHA])[ALPHA] == 0


def test_bits_per_byte_promotes_a_lossless_variant():
    margin = Q.metric_margins["bits_per_byte"]
    assert bpb_promote_rate(BPB_N, margin, 0.0, "lognormal", 100, seed=9, q=Q, level=ALPHA) > 0.9


# ---- group-sequential ------------------------------------------------------------------------------------

SEQ_N = (Q.sequential.min_items, 12032)  # the smallest task scored sequentially, and MMLU-Pro


@pytest.mark.parametrize(("n", "d"), [(SEQ_N[0], 0.02), (SEQ_N[0], 0.10), (SEQ_N[1], 0.05)])
def test_sequential_false_promotes_at_the_margin(n, d):
    """The eval stage's stopping rule (qgcore.stats.settle) then the gate's decision on the sequential
    comparison, 10,000 paths at the margin: within alpha, as at fixed n (a true 1.2 x alpha would exceed it
    with probability > 0.999; the design spends 0.9 x alpha, so a sound one stays below with 0.99)."""
    r = sequential_run(n, d, -Q.margins["8bit"], Q.margins["8bit"], Q, 10_000, seed=n + int(100 * d))
    assert r["promote"] <= ALPHA


@pytest.mark.parametrize("n", SEQ_N)
def test_sequential_saves_items_at_no_real_cost_in_power(n):
    """At no loss it scores at most 60% of the items and promotes within 2 points of fixed n on the same
    paths; at half the margin it still promotes within 2 points; at the margin futility saves a third."""
    m = Q.margins["8bit"]
    for d in (0.02, 0.05, 0.10):
        zero = sequential_run(n, d, 0.0, m, Q, 1000, seed=n + int(1000 * d))
        assert zero["items_share"] <= 0.60 and zero["promote"] >= zero["fixed_n_promote"] - 0.02, (d, zero)
        half = sequential_run(n, d, -m / 2, m, Q, 1000, seed=n + int(1000 * d) + 1)
        assert half["promote"] >= half["fixed_n_promote"] - 0.02, (d, half)
        at = sequential_run(n, d, -m, m, Q, 1000, seed=n + int(1000 * d) + 2)
        assert at["items_share"] <= 0.75, (d, at)
