"""Group-sequential boundaries against published values and an independent implementation."""

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from qgcore.sequential import Design, equal_looks, predictive_power, rci_level, spent

FIVE = tuple((j + 1) / 5 for j in range(5))


def test_lan_demets_obrien_fleming_matches_the_published_boundaries():
    # Lan-DeMets O'Brien-Fleming-type spending, 5 equally spaced looks, one-sided 0.025: the boundaries
    # gsDesign (sfLDOF) and Jennison & Turnbull tabulate: 4.8769, 3.3569, 2.6803, 2.2898, 2.0310
    assert [round(c, 4) for c in Design(FIVE, "obf").boundaries(0.025)] == [4.8769, 3.3570, 2.6803, 2.2898, 2.0310]


def test_pocock_constant_boundary_has_the_published_crossing_probability():
    # Pocock (1977), Jennison & Turnbull table 2.1: a constant boundary of 2.413 over 5 looks crosses with
    # probability 0.05 two-sided, i.e. 0.025 one-sided
    assert sum(Design(FIVE, "obf").crossing_probabilities([2.413] * 5)) == pytest.approx(0.025, abs=5e-5)


def _mvn_crossing(fractions, bounds):
    """Independent: P(some Z_j >= c_j) from scipy's multivariate normal CDF (Genz), corr = sqrt(t_i / t_j)."""
    t = np.array(fractions)
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    return 1 - multivariate_normal(mean=np.zeros(len(t)), cov=cov, abseps=1e-7).cdf(np.array(bounds))


@pytest.mark.parametrize(("spending", "alpha"), [("obf", 0.05), ("pocock", 0.05), ("pocock", 0.01),
                                                 ("obf", 0.0125)])
def test_boundaries_spend_exactly_alpha_by_an_independent_integration(spending, alpha):
    d = Design(FIVE, spending)
    bounds = d.boundaries(alpha)
    assert sum(d.crossing_probabilities(bounds)) == pytest.approx(alpha, rel=1e-4)
    assert _mvn_crossing(FIVE, bounds) == pytest.approx(alpha, rel=2e-3)
    # each look spends what the spending function allots to it
    spent_by = np.cumsum(d.crossing_probabilities(bounds))
    assert list(spent_by) == pytest.approx([spent(spending, alpha, t) for t in FIVE], rel=1e-4)


def test_the_sequential_p_value_is_the_smallest_alpha_that_crosses():
    d = Design(FIVE, "obf")
    path = [1.0, 2.5, 3.0]
    p = d.p_value(path)
    assert 0 < p < 1
    # at alpha = p the path touches some boundary; just below, it crosses none
    b_at = d.boundaries(p * 1.01)
    b_below = d.boundaries(p * 0.99)
    assert any(z >= c for z, c in zip(path, b_at, strict=False))
    assert not any(z >= c for z, c in zip(path, b_below, strict=False))
    assert d.p_value([-1.0, -2.0]) == 1.0 and d.p_value([math.inf]) == 0.0


def test_repeated_ci_levels_and_predictive_power():
    d = Design(FIVE, "obf")
    # the last look's repeated bound is at 1 - Phi(2.031) one-sided for alpha 0.025, well below the naive 2.5%
    assert rci_level(d, 0.025, 4) == pytest.approx(norm.sf(2.0310), rel=1e-3)
    # predictive power against an independent Monte Carlo: drift from its flat-prior posterior N(B_t/t, 1/t),
    # then the rest of the Brownian path
    rng = np.random.default_rng(1)
    for z, t, c in ((0.5, 0.2, 2.0), (1.8, 0.4, 2.3), (-0.3, 0.6, 2.0), (2.5, 0.8, 2.03)):
        b = z * math.sqrt(t)
        theta = rng.normal(b / t, math.sqrt(1 / t), 400_000)
        end = b + theta * (1 - t) + rng.normal(0, math.sqrt(1 - t), theta.size)
        assert predictive_power(z, t, c) == pytest.approx(float(np.mean(end >= c)), abs=0.004)
    assert predictive_power(3.0, 1.0, 1.96) == 1.0 and predictive_power(1.0, 1.0, 1.96) == 0.0


def test_equal_looks_end_at_n():
    assert equal_looks(12032, 5) == (2406, 4813, 7219, 9626, 12032)
    with pytest.raises(ValueError, match="cannot split 3 items into 5 looks"):
        equal_looks(3, 5)
