"""Paired statistics: reference values, independent implementations, and the properties the gate uses."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar
from scipy.stats import binomtest, bootstrap, norm

from qgcore.stats import (
    BCA,
    BCA_FACTOR,
    TANGO,
    TANGO_FACTOR,
    compare,
    level_key,
    mcnemar_exact,
    paired_bootstrap,
    ratio_statistic,
    ratio_upper,
    tango_bound,
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


def test_tango_scalar_and_array_paths_agree():
    n, up, down = np.array([100, 273, 12032]), np.array([1, 9, 400]), np.array([0, 4, 430])
    arr = tango_statistic(n, up, down, -0.02)
    each = [tango_statistic(int(a), int(b), int(c), -0.02) for a, b, c in zip(n, up, down, strict=True)]
    assert list(arr) == pytest.approx(each)


def test_tango_bounds_are_where_the_statistic_hits_z():
    z = norm.ppf(0.95)
    lo, hi = tango_bound(200, 7, 2, z, "lower"), tango_bound(200, 7, 2, z, "upper")
    assert tango_statistic(200, 7, 2, lo) == pytest.approx(z, abs=1e-9)
    assert tango_statistic(200, 7, 2, hi) == pytest.approx(-z, abs=1e-9)


def test_one_sided_discordance_gives_an_interval_reaching_below_zero():
    lo, hi = tango_interval(150, 3, 0)
    assert lo < 0 < 3 / 150 < hi


def _ratio_by_constrained_mle(a, b, c, d, theta):
    """Independent implementation of the paired-ratio score statistic: a 2-D constrained maximum likelihood
    (Nelder-Mead over p11, p10; p01 from the constraint), not the Lagrange root the code uses."""
    n = a + b + c + d

    def nll(x):
        p11, p10 = x
        p01 = theta * p10 + (theta - 1) * p11
        p00 = 1 - p11 - p10 - p01
        if min(p11, p10, p01, p00) <= 0:
            return 1e18
        return -(a * math.log(p11) + b * math.log(p10) + c * math.log(p01) + d * math.log(p00))

    best = min((minimize(nll, x0, method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-12, "maxiter": 40000})
                for x0 in ((a / n * 0.9 + 0.01, b / n * 0.9 + 0.01), (0.3, 0.1), (0.5, 0.05))), key=lambda r: r.fun)
    p11, p10 = best.x
    p01 = theta * p10 + (theta - 1) * p11
    return ((a + c) - theta * (a + b)) / math.sqrt(n * (p11 * (1 - theta) ** 2 + p10 * theta**2 + p01))


@pytest.mark.parametrize("cells", [(50, 10, 5, 35, 0.9), (50, 10, 5, 35, 1.1), (120, 8, 3, 69, 0.97),
                                   (30, 0, 4, 66, 0.9), (60, 5, 0, 35, 1.05), (400, 30, 12, 558, 0.95)])
def test_paired_ratio_score_agrees_with_an_independent_constrained_mle(cells):
    assert ratio_statistic(*cells) == pytest.approx(_ratio_by_constrained_mle(*cells), rel=1e-5)


def test_the_ratio_bound_is_where_the_statistic_hits_z():
    z = norm.ppf(0.95)
    up = ratio_upper(120, 8, 3, 69, z)
    assert ratio_statistic(120, 8, 3, 69, up) == pytest.approx(-z, abs=1e-7)
    assert 123 / 128 < up < 1.05


def test_bca_interval_agrees_with_scipys():
    """The gate's own BCa (it needs the p-value, which scipy does not give) against scipy's interval."""
    rng = np.random.default_rng(1)
    n = 200
    nb = rng.integers(200, 1500, n).astype(float)
    base = rng.gamma(20, 1.1 / 20, n)
    extra = np.where(rng.random(n) < 0.1, rng.exponential(0.3, n), 0) + rng.normal(0, 0.005, n)
    b, c = np.c_[base * nb, nb], np.c_[(base + extra) * nb, nb]
    mine = paired_bootstrap(b, c, n_resamples=20000, seed=0)

    def stat(bn, bd, cn, cd, axis=-1):
        return cn.sum(axis) / cd.sum(axis) - bn.sum(axis) / bd.sum(axis)

    ref = bootstrap((b[:, 0], b[:, 1], c[:, 0], c[:, 1]), stat, paired=True, vectorized=True, method="BCa",
                    confidence_level=0.95, n_resamples=20000, rng=np.random.default_rng(5)).confidence_interval
    width = ref.high - ref.low
    assert abs(mine.bound("lower", 0.025) - ref.low) < 0.03 * width
    assert abs(mine.bound("upper", 0.025) - ref.high) < 0.03 * width


def test_bca_p_value_is_the_level_at_which_the_bound_reaches_the_value():
    rng = np.random.default_rng(2)
    b = np.c_[rng.gamma(20, 0.05, 300) * 500, np.full(300, 500.0)]
    c = b.copy()
    c[:, 0] += rng.normal(0.01, 0.02, 300) * 500
    boot = paired_bootstrap(b, c, n_resamples=8000, seed=1)
    for level in (0.05, 0.01, 0.0125):
        assert boot.p_upper_below(boot.bound("upper", level)) == pytest.approx(level, rel=0.03)
        assert boot.p_lower_above(boot.bound("lower", level)) == pytest.approx(level, rel=0.03)


def test_bca_undefined_is_no_evidence_never_a_percentile_fallback():
    """Every resample on one side of the estimate: z0 is undefined; the test says nothing (p = 1)."""
    b = np.c_[np.ones(120) * 100, np.ones(120) * 100]
    c = b.copy()
    c[0, 0] += 50  # one document differs: every resample that keeps it is above, the rest equal
    boot = paired_bootstrap(b, c, n_resamples=2000, seed=0)
    if not boot.defined:
        assert boot.p_upper_below(1.0) == 1.0 and math.isnan(boot.bound("upper", 0.05))
    comp = compare({str(i): tuple(r) for i, r in enumerate(b)}, {str(i): tuple(r) for i, r in enumerate(c)},
                   metric="bits_per_byte", higher_is_better=False, margin=0.03)
    if not boot.defined:
        assert comp.p_noninferior == 1.0 and comp.method.endswith("undefined here")


def test_identical_runs_have_zero_delta_and_pass_a_positive_margin():
    a = _binary([1, 0, 1, 1, 0, 1] * 50)
    c = compare(a, dict(a), metric="acc", higher_is_better=True, binary=True, margin=0.05)
    assert c.delta == 0 and c.method == TANGO
    assert (c.right_to_wrong, c.wrong_to_right, c.mcnemar_p) == (0, 0, 1.0)
    # no discordant pair: Tango's statistic is sqrt(n m / (1 - m)) (3.97 here), calibrated by TANGO_FACTOR
    assert c.p_noninferior == pytest.approx(norm.sf(math.sqrt(300 * 0.05 / 0.95)) / TANGO_FACTOR)
    assert c.p_inferior == 1.0


def test_p_values_are_calibrated_and_match_the_interval_sides():
    base = _binary([1] * 200 + [0] * 100)
    cand = dict(base)
    for i in range(6):
        cand[str(i)] = (0.0, 1.0)
    for i in range(200, 203):
        cand[str(i)] = (1.0, 1.0)
    c = compare(base, cand, metric="acc", higher_is_better=True, binary=True, margin=0.02, levels=[0.05, 0.01])
    z = tango_statistic(300, 3, 6, -0.02)
    assert c.p_noninferior == pytest.approx(min(1.0, norm.sf(z) / TANGO_FACTOR))
    lo, _ = c.intervals[level_key(0.05)]
    assert lo == pytest.approx(tango_bound(300, 3, 6, norm.isf(0.05 * TANGO_FACTOR), "lower"))
    # passing at a level is the same event as the lower bound at that level clearing -margin
    for level in (0.05, 0.01):
        assert (c.p_noninferior < level) == (c.intervals[level_key(level)][0] > -0.02)


def test_bits_per_byte_uses_calibrated_bca():
    """The gate's p-value for bits/byte is BCa's own one-sided p over BCA_FACTOR, and each interval side is
    BCa's bound at factor x the level: a p below the level and a bound inside the margin say the same."""
    rng = np.random.default_rng(0)
    base = {str(i): (float(rng.gamma(20, 0.05)) * 800, 800.0) for i in range(700)}
    cand = {k: (v[0] + 0.02 * 800 + float(rng.normal(0, 40)), v[1]) for k, v in base.items()}
    c = compare(base, cand, metric="bits_per_byte", higher_is_better=False, margin=0.03, levels=[0.05], seed=3)
    assert c.method == BCA and c.n_boot == 4000 and c.delta == pytest.approx(0.02, abs=0.003)
    ids = sorted(base)
    boot = paired_bootstrap(np.array([base[i] for i in ids]), np.array([cand[i] for i in ids]), n_resamples=4000,
                            seed=3)
    assert c.p_noninferior == pytest.approx(min(1.0, boot.p_upper_below(0.03) / BCA_FACTOR))
    lo, hi = c.intervals[level_key(0.05)]
    assert hi == pytest.approx(boot.bound("upper", 0.05 * BCA_FACTOR)) and lo < c.delta < hi
    assert (c.p_noninferior < 0.05) == (hi < 0.03)
    assert 0 < BCA_FACTOR < 1


def test_mcnemar_exact_reference():
    assert mcnemar_exact(10, 5) == pytest.approx(0.30175781, abs=1e-7)
    for b, c in ((0, 3), (7, 7), (100, 130), (1, 0), (40, 61)):
        assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)


def test_chance_rate_and_floor_are_reported_for_binary_tasks():
    base = _binary([1] * 30 + [0] * 70)  # 0.30 on a 4-way task: not shown above chance at 5%
    c = compare(base, dict(base), metric="acc", higher_is_better=True, binary=True, margin=0.05, chance=0.25,
                floor=0.9)
    assert c.p_above_chance == pytest.approx(binomtest(30, 100, 0.25, alternative="greater").pvalue)
    assert c.recovery is None  # a ratio over a baseline not shown above chance says nothing
    strong = _binary([1] * 80 + [0] * 20)
    worse = dict(strong)
    for i in range(20):
        worse[str(i)] = (0.0, 1.0)
    c = compare(strong, worse, metric="acc", higher_is_better=True, binary=True, margin=0.3, chance=0.25, floor=0.9)
    assert c.recovery == pytest.approx(0.75) and c.p_below_floor < 0.05
    assert c.recovery_upper[level_key(0.05)] < 0.9


def test_unmatched_items_are_counted():
    c = compare(_binary([1, 0, 1]), {"0": (1.0, 1.0), "1": (0.0, 1.0), "9": (1.0, 1.0)}, metric="acc",
                higher_is_better=True, binary=True, margin=0.05)
    assert c.n_items == 2 and c.n_unmatched == 2
