"""Paired comparison of a variant with bf16 on identical items: delta, a CI with honest coverage, flips.

Every metric is a ratio of per-item sums, Σnum/Σden: accuracy has num = correct (0/1) and den = 1;
bits-per-byte has num = -loglik/ln2 and den = bytes. Intervals:

- binary outcomes: Tango's (1998) score interval for the difference of paired proportions. It depends
  only on the discordant counts, and unlike the percentile bootstrap it keeps its level when the
  discordant pairs are few and one-sided (exactly where 8-bit variants live). Not in scipy/statsmodels,
  so written here and checked against a published value (tests/unit/test_stats.py).
- continuous and ratio metrics: scipy's BCa bootstrap over items (paired resampling), which corrects the
  skew that damage concentrated in a few documents produces.

The level is a parameter: the gate asks for a family-wise (Bonferroni) level when several variants
compete. McNemar's exact p-value (scipy's binomial test on the discordant pairs) is reported too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

Item = tuple[float, float]  # (num, den)
TANGO = "Tango score (paired proportions)"
BCA = "BCa bootstrap over items (paired)"


@dataclass(frozen=True)
class Comparison:
    metric: str
    higher_is_better: bool
    n_items: int
    n_unmatched: int  # items present in only one run (excluded; the gate makes the task inconclusive)
    baseline: float
    candidate: float
    delta: float  # candidate - baseline, in metric units
    ci_low: float
    ci_high: float
    level: float  # two-sided confidence level of [ci_low, ci_high]
    ci_method: str
    recovery: float | None  # candidate/baseline (inverse when lower is better); None where it says nothing
    right_to_wrong: int | None = None  # binary metrics only
    wrong_to_right: int | None = None
    mcnemar_p: float | None = None
    chance: float | None = None  # chance accuracy of the task (1/choices), binary multiple choice only
    baseline_ci_low: float | None = None  # Wilson interval of bf16's own accuracy, at the same level
    n_boot: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def tango_statistic(n: int, up: int, down: int, delta0: float) -> float:
    """Tango's score statistic for H0: p(up) - p(down) = delta0 (up = wrong->right, down = right->wrong).

    Uses the constrained maximum-likelihood estimate of p(down) under H0 (Tango 1998, eq. 3). Decreasing in
    delta0, so the interval {delta0: |T| <= z} is found by root finding.
    """
    w = -up - down + (2 * n - up + down) * delta0
    disc = max(w * w + 8 * n * down * delta0 * (1 - delta0), 0.0)
    p_down = (math.sqrt(disc) - w) / (4 * n)
    var = n * (2 * p_down + delta0 * (1 - delta0))
    num = up - down - n * delta0
    if var <= 0:
        return math.copysign(math.inf, num) if num else 0.0
    return num / math.sqrt(var)


def _root(f: Callable[[float], float], lo: float, hi: float) -> float:  # f(lo) > 0 > f(hi)
    for _ in range(200):  # bisection to machine precision: f is monotone, no derivative needed
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tango_interval(n: int, up: int, down: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided `level` score interval for p(up) - p(down) from n pairs with up/down discordant counts."""
    if n <= 0:
        raise ValueError("tango_interval needs n > 0")
    z = _z(level)
    est = (up - down) / n
    eps = 1e-12
    lo = -1.0 if tango_statistic(n, up, down, -1 + eps) <= z else _root(
        lambda d: tango_statistic(n, up, down, d) - z, -1 + eps, est)
    hi = 1.0 if tango_statistic(n, up, down, 1 - eps) >= -z else _root(
        lambda d: tango_statistic(n, up, down, d) + z, est, 1 - eps)
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b discordant pairs out of b + c at 1/2."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def wilson_low(k: int, n: int, level: float) -> float:
    from scipy.stats import binomtest

    return float(binomtest(k, n).proportion_ci(confidence_level=level, method="wilson").low)


def bca_ratio_difference(b: np.ndarray, c: np.ndarray, *, level: float, n_resamples: int,
                         seed: int) -> tuple[float, float]:
    """BCa interval of Σc_num/Σc_den - Σb_num/Σb_den, resampling items (paired). b, c: (n, 2) arrays."""
    from scipy.stats import bootstrap

    def stat(bn: np.ndarray, bd: np.ndarray, cn: np.ndarray, cd: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(cn.sum(axis=axis) / cd.sum(axis=axis) - bn.sum(axis=axis) / bd.sum(axis=axis))

    diffs = c[:, 0] / c[:, 1] - b[:, 0] / b[:, 1]
    point = float(stat(b[:, 0], b[:, 1], c[:, 0], c[:, 1]))
    if np.ptp(diffs) == 0 and np.ptp(b[:, 1]) == 0:
        return point, point  # every item moved by the same amount: no sampling variability to show
    res = bootstrap((b[:, 0], b[:, 1], c[:, 0], c[:, 1]), stat, paired=True, vectorized=True, method="BCa",
                    confidence_level=level, n_resamples=n_resamples, rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(lo) or math.isnan(hi):  # degenerate jackknife: fall back to the percentile interval
        q = np.quantile(res.bootstrap_distribution, [(1 - level) / 2, (1 + level) / 2])
        lo, hi = float(q[0]), float(q[1])
    return lo, hi


def _ratio(a: np.ndarray) -> float:
    total = float(a[:, 1].sum())
    return float(a[:, 0].sum()) / total if total else float("nan")


def compare(
    baseline: dict[str, Item],
    candidate: dict[str, Item],
    *,
    metric: str,
    higher_is_better: bool,
    binary: bool = False,
    level: float = 0.95,
    chance: float | None = None,
    n_boot: int = 4000,
    seed: int = 0,
) -> Comparison:
    """Compare on the items both runs scored. `binary`: 0/1 outcomes (Tango interval, flips, McNemar)."""
    ids = sorted(set(baseline) & set(candidate))
    unmatched = len(set(baseline) ^ set(candidate))
    if not ids:
        raise ValueError(f"{metric}: the two runs share no items; they must be scored on the same items")
    b = np.array([baseline[i] for i in ids], dtype=float)
    c = np.array([candidate[i] for i in ids], dtype=float)
    base, cand = _ratio(b), _ratio(c)
    n = len(ids)
    extra: dict[str, Any] = {}
    if binary:
        down = int(np.sum((b[:, 0] == 1) & (c[:, 0] == 0)))
        up = int(np.sum((b[:, 0] == 0) & (c[:, 0] == 1)))
        lo, hi = tango_interval(n, up, down, level)
        delta = (up - down) / n  # exact for 0/1 items, no difference of rounded quotients
        method, boots = TANGO, 0
        extra = {"right_to_wrong": down, "wrong_to_right": up, "mcnemar_p": mcnemar_exact(down, up),
                 "chance": chance,
                 "baseline_ci_low": wilson_low(int(b[:, 0].sum()), n, level) if chance is not None else None}
    else:
        delta = cand - base
        lo, hi = bca_ratio_difference(b, c, level=level, n_resamples=n_boot, seed=seed)
        method, boots = BCA, n_boot
    if higher_is_better:
        recovery = cand / base if base else None
    else:
        recovery = base / cand if cand else None
    if chance is not None and binary and not extra["baseline_ci_low"] > chance:
        recovery = None  # a ratio over a chance-level baseline says nothing
    return Comparison(metric=metric, higher_is_better=higher_is_better, n_items=n, n_unmatched=unmatched,
                      baseline=base, candidate=cand, delta=delta, ci_low=lo, ci_high=hi, level=level,
                      ci_method=method, recovery=recovery, n_boot=boots, **extra)


def familywise_level(alpha: float, k: int, correction: str) -> float:
    """Per-comparison two-sided level so that k competing variants keep the family-wise error <= alpha."""
    if correction == "none" or k <= 1:
        return 1 - alpha
    if correction == "bonferroni":
        return 1 - alpha / k
    raise ValueError(f"unknown multiplicity correction '{correction}' (use bonferroni or none)")


def compare_runs(run: Any, baseline: Any, *, level: float = 0.95) -> dict[str, dict[str, Any]]:  # EvalRun-like
    """Paired comparisons of every task two eval runs both scored ok, as dicts (what eval.json and the gate
    store). The chance rate comes from the baseline's task (bf16 decides whether a task can say anything)."""
    out = {}
    for task, res in run.tasks.items():
        base = baseline.tasks.get(task)
        if res.status != "ok" or base is None or base.status != "ok" or run.variant == baseline.variant:
            continue
        c = compare({k: tuple(v) for k, v in base.items.items()}, {k: tuple(v) for k, v in res.items.items()},
                    metric=res.metric or "", higher_is_better=res.higher_is_better, binary=res.binary, level=level,
                    chance=base.chance)
        out[task] = c.to_dict()
    return out
