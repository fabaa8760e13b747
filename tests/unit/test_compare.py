import math

import numpy as np
import pytest

from evals.compare import compare, mcnemar_exact


def _binary(values):
    return {str(i): (float(v), 1.0) for i, v in enumerate(values)}


def test_identical_runs_have_zero_delta_and_no_flips():
    a = _binary([1, 0, 1, 1, 0] * 20)
    c = compare(a, dict(a), metric="acc", higher_is_better=True, binary=True)
    assert (c.delta, c.ci_low, c.ci_high) == (0.0, 0.0, 0.0)
    assert (c.right_to_wrong, c.wrong_to_right, c.mcnemar_p) == (0, 0, 1.0)
    assert c.recovery == 1.0 and c.n_items == 100


def test_flip_counts_and_delta_known():
    base = _binary([1] * 60 + [0] * 40)
    cand = _binary([1] * 50 + [0] * 10 + [1] * 5 + [0] * 35)  # 10 right->wrong, 5 wrong->right
    c = compare(base, cand, metric="acc", higher_is_better=True, binary=True)
    assert (c.right_to_wrong, c.wrong_to_right) == (10, 5)
    assert c.delta == pytest.approx(-0.05)
    assert c.ci_low < -0.05 < c.ci_high
    assert c.recovery == pytest.approx(0.55 / 0.60)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


def test_only_shared_items_are_compared():
    base = _binary([1, 1, 0, 0])
    cand = {"0": (1.0, 1.0), "1": (0.0, 1.0), "9": (1.0, 1.0)}
    c = compare(base, cand, metric="acc", higher_is_better=True, binary=True)
    assert c.n_items == 2 and c.n_unmatched == 3
    assert c.delta == pytest.approx(-0.5)


def test_no_shared_items_is_an_error():
    with pytest.raises(ValueError, match="share no items"):
        compare({"a": (1.0, 1.0)}, {"b": (1.0, 1.0)}, metric="acc", higher_is_better=True)


def test_ratio_metric_lower_is_better():
    # bits per byte = sum(bits) / sum(bytes); candidate spends 10% more bits on every doc
    base = {str(i): (100.0 + i, 100.0) for i in range(50)}
    cand = {k: (v[0] * 1.1, v[1]) for k, v in base.items()}
    c = compare(base, cand, metric="bits_per_byte", higher_is_better=False)
    expected = sum(v[0] for v in base.values()) / 5000
    assert c.baseline == pytest.approx(expected)
    assert c.delta == pytest.approx(0.1 * expected)
    assert c.recovery == pytest.approx(1 / 1.1)
    assert c.ci_low > 0  # consistently worse: the CI excludes zero
    assert c.right_to_wrong is None


def test_paired_ci_covers_true_delta_about_95_percent():
    rng = np.random.default_rng(1)
    n, covered, reps = 300, 0, 200
    for r in range(reps):
        base = rng.random(n) < 0.6
        flip_down = rng.random(n) < 0.08
        flip_up = rng.random(n) < 0.05
        cand = np.where(base, ~flip_down, flip_up)
        pop_delta = 0.4 * 0.05 - 0.6 * 0.08  # E[cand] - E[base]
        c = compare(_binary(base), _binary(cand), metric="acc", higher_is_better=True, binary=True, seed=r, n_boot=500)
        covered += c.ci_low <= pop_delta <= c.ci_high
    assert math.isclose(pop_delta, -0.028)
    assert 0.88 <= covered / reps <= 0.99
