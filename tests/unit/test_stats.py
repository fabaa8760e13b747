"""Paired statistics: reference values, an independent implementation, and the properties the gate uses."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from qgcore.stats import (
    BCA,
    TANGO,
    compare,
    familywise_level,
    mcnemar_exact,
    tango_interval,
    tango_statistic,
)


def _binary(values):
    return {str(i): (float(v), 1.0) for i, v in enumerate(values)}


def test_tango_matches_the_published_example():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (Cavo et al. 2012 data):
    # n12 = 6, n21 = 16, N = 161 -> estimate -0.0621, Tango asymptotic score 95% CI -0.1240 to -0.0054.
    lo, hi = tango_interval(161, 6, 16, 0.95)
    assert (round(lo, 4), round(hi, 4)) == (-0.1240, -0.0054)


def _tango_by_profile_likelihood(n, up, down, delta0):
    """Independent implementation: maximise the multinomial likelihood under p_up - p_down = delta0
    numerically (no closed form), then form the score statistic."""
    rest = n - up - down

    def negll(p_down):
        p_up = p_down + delta0
        p_same = 1 - p_up - p_down
        return -(up * math.log(p_up) + down * math.log(p_down) + rest * math.log(p_same))

    lo, hi = max(0.0, -delta0) + 1e-12, (1 - delta0) / 2 - 1e-12
    p_down = minimize_scalar(negll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-13}).x
    return (up - down - n * delta0) / math.sqrt(n * (2 * p_down + delta0 * (1 - delta0)))


@pytest.mark.parametrize(("n", "up", "down", "delta0"), [
    (150, 3, 0, -0.02), (150, 0, 3, -0.02), (273, 2, 9, -0.05), (1000, 40, 60, -0.02), (161, 6, 16, 0.01),
])
def test_tango_statistic_agrees_with_a_numerical_constrained_mle(n, up, down, delta0):
    assert tango_statistic(n, up, down, delta0) == pytest.approx(
        _tango_by_profile_likelihood(n, up, down, delta0), rel=1e-5)


def test_tango_bounds_are_where_the_statistic_hits_z():
    lo, hi = tango_interval(200, 7, 2, 0.9)
    z = norm.ppf(0.95)
    assert tango_statistic(200, 7, 2, lo) == pytest.approx(z, abs=1e-9)
    assert tango_statistic(200, 7, 2, hi) == pytest.approx(-z, abs=1e-9)


def test_one_sided_discordance_gives_an_interval_reaching_below_zero():
    # The audit's case: 0 right->wrong, 3 wrong->right on 150 items; the percentile bootstrap gave
    # [+0.000, +0.047]. Three flips cannot rule out a small loss.
    lo, hi = tango_interval(150, 3, 0)
    assert lo < 0 < hi


def test_identical_runs_have_zero_delta_and_an_honest_interval():
    a = _binary([1, 0, 1, 1, 0] * 30)
    c = compare(a, dict(a), metric="acc", higher_is_better=True, binary=True)
    assert c.delta == 0.0 and c.ci_method == TANGO
    assert -0.03 < c.ci_low < 0 < c.ci_high < 0.03  # no disagreement in 150 items still leaves doubt
    assert (c.right_to_wrong, c.wrong_to_right, c.mcnemar_p) == (0, 0, 1.0)


def test_flip_counts_delta_and_recovery():
    base = _binary([1] * 60 + [0] * 40)
    cand = _binary([1] * 50 + [0] * 10 + [1] * 5 + [0] * 35)  # 10 right->wrong, 5 wrong->right
    c = compare(base, cand, metric="acc", higher_is_better=True, binary=True)
    assert (c.right_to_wrong, c.wrong_to_right) == (10, 5)
    assert c.delta == -0.05 and c.ci_low < -0.05 < c.ci_high
    assert c.recovery == pytest.approx(0.55 / 0.60)


def test_mcnemar_exact_reference():
    # two-sided exact binomial test, 10 vs 5 discordant: 2 * P(X <= 5 | n=15, p=.5) = 0.3018
    assert mcnemar_exact(10, 5) == pytest.approx(0.30175781, abs=1e-7)


def test_chance_level_baseline_has_no_recovery():
    rng = np.random.default_rng(0)
    base = _binary((rng.random(150) < 0.25).astype(int))
    cand = _binary((rng.random(150) < 0.27).astype(int))
    c = compare(base, cand, metric="acc", higher_is_better=True, binary=True, chance=0.25)
    assert c.recovery is None and c.baseline_ci_low < 0.25


def test_unmatched_items_are_counted():
    c = compare(_binary([1, 0, 1]), {"0": (1.0, 1.0), "1": (0.0, 1.0), "9": (1.0, 1.0)}, metric="acc",
                higher_is_better=True, binary=True)
    assert (c.n_items, c.n_unmatched) == (2, 2)


def test_bits_per_byte_uses_bca_and_covers_a_shift():
    rng = np.random.default_rng(1)
    n = 300
    nbytes = rng.integers(200, 1500, n).astype(float)
    bits = nbytes * rng.normal(1.1, 0.1, n)
    base = {str(i): (bits[i], nbytes[i]) for i in range(n)}
    cand = {str(i): (bits[i] * 1.02, nbytes[i]) for i in range(n)}
    c = compare(base, cand, metric="bits_per_byte", higher_is_better=False, level=0.95)
    assert c.ci_method == BCA and c.ci_low <= c.delta <= c.ci_high
    assert c.delta == pytest.approx(0.02 * sum(bits) / sum(nbytes))


def test_familywise_level():
    assert familywise_level(0.05, 5, "bonferroni") == pytest.approx(0.99)
    assert familywise_level(0.05, 5, "none") == pytest.approx(0.95)
    assert familywise_level(0.05, 1, "bonferroni") == pytest.approx(0.95)
    with pytest.raises(ValueError, match="unknown multiplicity"):
        familywise_level(0.05, 3, "holmes")
