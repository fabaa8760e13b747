"""Paired comparison of a variant with the reference on identical items: the tests the gate decides on.

Every metric is a ratio of per-item sums, Σnum/Σden: accuracy has num = correct (0/1) and den = 1;
bits-per-byte has num = -loglik/ln2 and den = bytes. Each comparison is a *non-inferiority test* at a
margin, reported as one-sided p-values and, for people, as intervals whose sides are the one-sided bounds
at each level the gate may use:

- binary outcomes: Tango's (1998) score statistic for the difference of paired proportions. It depends
  only on the discordant counts and keeps its level when they are few and one-sided, where the percentile
  bootstrap did not. Not in scipy/statsmodels: written here, checked against a published value and a
  numerical constrained MLE (tests/unit/test_stats.py).
- recovery floors (binary only): the score test for the *ratio* of paired proportions (Nam & Blackwelder
  2002; Tang, Tang & Chan 2003), constrained MLE by a one-dimensional root; rejection-only (see
  reports/gate.py): a floor fails a variant only when the ratio's upper bound is below it.
- continuous and ratio metrics (bits/byte): the BCa bootstrap over items (paired), written here because
  the gate needs its p-value (scipy gives only the interval; the interval is reference-checked against
  scipy's). Where BCa is undefined (a degenerate jackknife, every resample on one side) the test says
  nothing (p = 1): never a percentile interval instead.
- group-sequential binary tasks: Tango's statistic at each look against Lan–DeMets boundaries
  (qgcore.sequential); the p-value is the sequential one and the interval the repeated CI of the last look.

Calibration: each method's p-values are divided by a factor measured so that the simulated worst case
over the documented grid stays within the level (`make bench-gate`, README "What the gate can and cannot
see"): a calibrated p below a is a false promote with probability <= a at every n the tool uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy.optimize import brentq

from qgcore.sequential import Design, Spending, predictive_power, rci_level

Item = tuple[float, float]  # (num, den)
TANGO = "Tango score (paired proportions)"
TANGO_SEQ = "Tango score, group-sequential (repeated CI)"
BCA = "BCa bootstrap over items (paired)"
# Measured factors (README, `make bench-gate`): the nominal level a method is run at is factor x the level
# promised. Tango's score test runs a little liberal at small n (exact enumeration: 5.48% at a nominal 5%,
# 4-bit margin, n = 150, d = 5%), so it runs at 0.9 x the level (worst case then 4.83% at 5%, and within the
# level at every alpha / k the gate uses). BCa on bits/byte undercovers where damage is heavy-tailed or in
# few documents (lognormal sigma 1.2 at n = 600: 3.1% at a nominal 1.25%, 0.92% at 0.25%), so it runs at a
# fifth of the level, on at least 600 documents (quality.min_items.continuous): at n = 200 no factor holds
# alpha / 5 (1.3% at a nominal 0.2%: the samples that miss the tail look lossless at any level).
TANGO_FACTOR = 0.9
BCA_FACTOR = 0.2
_N = NormalDist()


def level_key(a: float) -> str:
    """How a one-sided level is written as a dict key in artifacts (exactly reproducible)."""
    return repr(float(a))


@dataclass(frozen=True)
class Comparison:
    metric: str
    higher_is_better: bool
    binary: bool
    n_items: int
    n_unmatched: int  # items present in only one run (excluded; the gate makes the task inconclusive)
    baseline: float
    candidate: float
    delta: float  # candidate - baseline, in metric units
    margin: float  # the non-inferiority margin tested (metric units, absolute)
    method: str
    # one-sided, calibrated: small p_noninferior = non-inferiority shown; small p_inferior = worse than the
    # margin shown; p_below_floor: recovery below the floor shown (binary with a floor only)
    p_noninferior: float
    p_inferior: float
    intervals: dict[str, list[float]]  # level_key(a) -> [lower, upper], each side a one-sided bound at a
    recovery: float | None  # candidate/baseline (inverse when lower is better); None where it says nothing
    floor: float | None = None
    p_below_floor: float | None = None
    recovery_upper: dict[str, float] = field(default_factory=dict)  # level -> upper bound of the paired ratio
    right_to_wrong: int | None = None  # binary metrics only
    wrong_to_right: int | None = None
    mcnemar_p: float | None = None
    chance: float | None = None  # chance accuracy of the task (1/choices), binary multiple choice only
    p_above_chance: float | None = None  # exact binomial p for "the reference beats chance"
    n_boot: int = 0
    sequential: dict[str, Any] | None = None  # looks, the stopped look, Z per look, spending, items saved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- Tango: difference of paired proportions ---------------------------------------------------------

def tango_statistic(n: Any, up: Any, down: Any, delta0: float) -> Any:
    """Tango's score statistic for H0: p(up) - p(down) = delta0 (up = wrong->right, down = right->wrong).

    Uses the constrained maximum-likelihood estimate of p(down) under H0 (Tango 1998, eq. 3). Decreasing in
    delta0. Works on scalars and numpy arrays alike (the simulations pass arrays of tables).
    """
    if all(isinstance(x, (int, float)) for x in (n, up, down)):
        return _tango_scalar(float(n), float(up), float(down), delta0)
    n, up, down = (np.asarray(x, dtype=float) for x in (n, up, down))
    w = -up - down + (2 * n - up + down) * delta0
    disc = np.maximum(w * w + 8 * n * down * delta0 * (1 - delta0), 0.0)
    p_down = (np.sqrt(disc) - w) / (4 * n)
    var = n * (2 * p_down + delta0 * (1 - delta0))
    num = up - down - n * delta0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), np.sign(num) * np.inf)
    t = np.where(num == 0, np.where(var > 0, t, 0.0), t)
    return float(t) if t.ndim == 0 else t


def _tango_scalar(n: float, up: float, down: float, delta0: float) -> float:
    w = -up - down + (2 * n - up + down) * delta0
    p_down = (math.sqrt(max(w * w + 8 * n * down * delta0 * (1 - delta0), 0.0)) - w) / (4 * n)
    var = n * (2 * p_down + delta0 * (1 - delta0))
    num = up - down - n * delta0
    if num == 0:
        return 0.0
    return num / math.sqrt(var) if var > 0 else math.copysign(math.inf, num)


def tango_bound(n: int, up: int, down: int, z: float, side: str) -> float:
    """The delta0 where the statistic equals +z (side="lower") or -z ("upper"): a one-sided bound."""
    eps = 1e-12
    est = (up - down) / n
    if side == "lower":
        if tango_statistic(n, up, down, -1 + eps) <= z:
            return -1.0
        return float(brentq(lambda d: tango_statistic(n, up, down, d) - z, -1 + eps, est, xtol=1e-14))
    if tango_statistic(n, up, down, 1 - eps) >= -z:
        return 1.0
    return float(brentq(lambda d: tango_statistic(n, up, down, d) + z, est, 1 - eps, xtol=1e-14))


def tango_interval(n: int, up: int, down: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided `level` score interval for p(up) - p(down) from n pairs with up/down discordant counts."""
    if n <= 0:
        raise ValueError("tango_interval needs n > 0")
    z = _N.inv_cdf(0.5 + level / 2)
    return tango_bound(n, up, down, z, "lower"), tango_bound(n, up, down, z, "upper")


def _sf(z: float) -> float:
    return 0.0 if z == math.inf else 1.0 if z == -math.inf else 1.0 - _N.cdf(z)


# ---- the paired ratio (recovery floors) --------------------------------------------------------------

def ratio_statistic(a: int, b: int, c: int, d: int, theta: float) -> float:
    """Score statistic for H0: p_cand / p_base = theta on paired binary outcomes (Nam & Blackwelder 2002;
    Tang, Tang & Chan 2003). a = both right, b = base right / cand wrong, c = base wrong / cand right,
    d = both wrong. Decreasing in theta.

    The constrained MLE: with Lagrange multiplier mu for p01 = theta p10 + (theta - 1) p11, p11 = a/(n -
    mu (theta - 1)), p10 = b/(n - mu theta), p01 = c/(n + mu), p00 = d/n; g(mu) = p01 - theta p10 -
    (theta - 1) p11 falls strictly in mu, so its root is found by bracketing. Where it has none inside the
    range that keeps every cell positive, the optimum is on its edge: the empty cell whose denominator
    vanishes there takes what the constraint leaves.
    """
    n = a + b + c + d
    xb, xc = a + b, a + c
    num = xc - theta * xb
    if num == 0:
        return 0.0
    # (count, coefficient in g, the mu where the cell's denominator vanishes, the side of that edge)
    cells = {"p11": (a, -(theta - 1), n / (theta - 1) if theta != 1 else math.inf,
                     "hi" if theta > 1 else "lo"),
             "p10": (b, -theta, n / theta, "hi"), "p01": (c, 1.0, -float(n), "lo")}
    lo = max([e for (_, _, e, side) in cells.values() if side == "lo" and math.isfinite(e)], default=-math.inf)
    hi = min([e for (_, _, e, side) in cells.values() if side == "hi" and math.isfinite(e)], default=math.inf)

    def probs(mu: float) -> dict[str, float]:
        denom = {"p11": n - mu * (theta - 1), "p10": n - mu * theta, "p01": n + mu}
        return {k: cnt / denom[k] for k, (cnt, _, _, _) in cells.items() if cnt}

    def g(mu: float) -> float:
        return sum(cells[k][1] * p for k, p in probs(mu).items())

    eps = 1e-10 * n
    lo_b, hi_b = (lo + eps if math.isfinite(lo) else -1e9 * n), (hi - eps if math.isfinite(hi) else 1e9 * n)
    g_lo, g_hi = g(lo_b), g(hi_b)
    if g_lo > 0 > g_hi:
        p = probs(brentq(g, lo_b, hi_b, xtol=1e-13 * n, maxiter=500))
    else:  # the optimum is on the edge where g keeps its sign: the empty cell there is free
        edge, side = (hi, "hi") if g_hi >= 0 else (lo, "lo")
        free = next(k for k, (cnt, _, e, sd) in cells.items() if not cnt and sd == side and e == edge)
        p = probs(edge)
        p[free] = -sum(cells[k][1] * v for k, v in p.items()) / cells[free][1]
    p11, p10, p01 = p.get("p11", 0.0), p.get("p10", 0.0), p.get("p01", 0.0)
    var = p11 * (1 - theta) ** 2 + p10 * theta**2 + p01
    if var <= 0:
        return math.copysign(math.inf, num)
    return float(num / math.sqrt(n * var))


def ratio_upper(a: int, b: int, c: int, d: int, z: float) -> float:
    """Upper one-sided bound of p_cand / p_base: the largest theta with statistic >= -z."""
    if a + b == 0:
        return math.inf
    est = (a + c) / (a + b)
    hi = max(2 * est, 1.0) + 1.0
    while ratio_statistic(a, b, c, d, hi) > -z and hi < 1e6:
        hi *= 2
    return float(brentq(lambda t: ratio_statistic(a, b, c, d, t) + z, max(est, 1e-12), hi, xtol=1e-12))


# ---- BCa bootstrap with its p-value ------------------------------------------------------------------

@dataclass(frozen=True)
class Bootstrap:
    """A paired bootstrap of Σc_num/Σc_den - Σb_num/Σb_den with what BCa needs."""

    theta: float
    dist: np.ndarray  # sorted resampled statistics
    z0: float  # bias correction (nan: undefined)
    accel: float  # acceleration from the jackknife (nan: undefined)

    @property
    def degenerate(self) -> bool:
        return bool(self.dist[0] == self.dist[-1])  # a point mass: every item moved by the same amount

    @property
    def defined(self) -> bool:
        return self.degenerate or (math.isfinite(self.z0) and math.isfinite(self.accel))

    def quantile_level(self, side: str, alpha: float) -> float:
        """The bootstrap percentile BCa uses for a one-sided `alpha` bound on `side` (lower/upper)."""
        z = _N.inv_cdf(alpha if side == "lower" else 1 - alpha)
        s = self.z0 + z
        return _N.cdf(self.z0 + s / (1 - self.accel * s))

    def bound(self, side: str, alpha: float) -> float:
        if self.degenerate:
            return self.theta
        if not self.defined:
            return math.nan
        return float(np.quantile(self.dist, self.quantile_level(side, alpha)))

    def p_upper_below(self, m: float) -> float:
        """One-sided p for 'the statistic is below m' (the alpha at which the upper BCa bound reaches m)."""
        return self._p(m, "upper")

    def p_lower_above(self, m: float) -> float:
        """One-sided p for 'the statistic is above m' (the alpha at which the lower bound reaches m)."""
        return self._p(m, "lower")

    def _p(self, m: float, side: str) -> float:
        if self.degenerate:
            return 0.0 if (self.theta < m if side == "upper" else self.theta > m) else 1.0
        if not self.defined:
            return 1.0
        n = len(self.dist)
        frac = float(np.searchsorted(self.dist, m, "left") + np.searchsorted(self.dist, m, "right")) / (2 * n)
        frac = min(max(frac, 0.5 / n), 1 - 0.5 / n)  # beyond the resamples: as far as they can tell
        w = _N.inv_cdf(frac) - self.z0
        if 1 + self.accel * w <= 0:
            return 1.0
        s = w / (1 + self.accel * w)
        u = s - self.z0  # the normal quantile of the bound's one-sided level
        return float(_N.cdf(-u) if side == "upper" else _N.cdf(u))


def paired_bootstrap(b: np.ndarray, c: np.ndarray, *, n_resamples: int, seed: int) -> Bootstrap:
    """Resample items (pairs) with replacement; b, c are (n, 2) arrays of (num, den)."""
    n = len(b)
    rng = np.random.default_rng(seed)

    def stat(bn: np.ndarray, bd: np.ndarray, cn: np.ndarray, cd: np.ndarray) -> np.ndarray:
        return np.asarray(cn / cd - bn / bd)

    theta = float(stat(b[:, 0].sum(), b[:, 1].sum(), c[:, 0].sum(), c[:, 1].sum()))
    out = np.empty(n_resamples)
    cols = [np.ascontiguousarray(x) for x in (b[:, 0], b[:, 1], c[:, 0], c[:, 1])]  # contiguous gathers: 1.5x
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        out[start:start + len(idx)] = stat(*(np.take(col, idx).sum(1) for col in cols))
    out.sort()
    less, leq = np.searchsorted(out, theta, "left"), np.searchsorted(out, theta, "right")
    frac = (less + leq) / (2 * n_resamples)
    z0 = _N.inv_cdf(frac) if 0 < frac < 1 else math.nan
    tot = b.sum(0), c.sum(0)
    jack = stat(tot[0][0] - b[:, 0], tot[0][1] - b[:, 1], tot[1][0] - c[:, 0], tot[1][1] - c[:, 1])
    dev = jack.mean() - jack
    denom = 6.0 * float(np.sum(dev**2)) ** 1.5
    accel = float(np.sum(dev**3)) / denom if denom > 0 else math.nan
    return Bootstrap(theta, out, z0, accel)


# ---- the comparison the gate decides on -------------------------------------------------------------

@dataclass(frozen=True)
class SequentialSpec:
    """How a group-sequential task was scored: items in `order` (recorded, seeded), looks at cumulative
    counts `looks`, Lan–DeMets `spending`; `stopped_at`: index of the last look scored."""

    order: list[str]
    looks: list[int]
    spending: Spending
    stopped_at: int

    @property
    def design(self) -> Design:
        k = len(self.looks)
        return Design(tuple((j + 1) / k for j in range(k)), self.spending)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b discordant pairs out of b + c at 1/2, which by
    symmetry is twice the smaller tail (scipy's binomtest gives the same; checked in the tests)."""
    from scipy.stats import binom

    if b + c == 0 or b == c:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), b + c, 0.5)))


def p_above_chance(k: int, n: int, chance: float) -> float:
    """Exact one-sided binomial p for 'the reference's accuracy exceeds chance' (k right of n)."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, chance, alternative="greater").pvalue)


def _ratio(a: np.ndarray) -> float:
    total = float(a[:, 1].sum())
    return float(a[:, 0].sum()) / total if total else float("nan")


def compare(
    baseline: dict[str, Item],
    candidate: dict[str, Item],
    *,
    metric: str,
    higher_is_better: bool,
    margin: float,
    binary: bool = False,
    levels: Sequence[float] = (0.05,),
    floor: float | None = None,
    chance: float | None = None,
    sequential: SequentialSpec | None = None,
    n_boot: int = 4000,
    seed: int = 0,
) -> Comparison:
    """Compare on the items both runs scored, against `margin`; intervals at every one-sided level in
    `levels` (the gate's Holm levels). `binary`: 0/1 outcomes (Tango, flips, McNemar, floor, chance)."""
    ids = sorted(set(baseline) & set(candidate))
    unmatched = len(set(baseline) ^ set(candidate))
    if sequential is not None:
        scored = set(sequential.order[:sequential.looks[sequential.stopped_at]])
        ids = [i for i in ids if i in scored]
        unmatched = len(scored - (set(baseline) & set(candidate)))
    if not ids:
        raise ValueError(f"{metric}: the two runs share no items; they must be scored on the same items")
    b = np.array([baseline[i] for i in ids], dtype=float)
    c = np.array([candidate[i] for i in ids], dtype=float)
    base, cand = _ratio(b), _ratio(c)
    n = len(ids)
    if higher_is_better:
        recovery = cand / base if base else None
    else:
        recovery = base / cand if cand else None
    common: dict[str, Any] = {"metric": metric, "higher_is_better": higher_is_better, "binary": binary,
                              "n_items": n, "n_unmatched": unmatched, "baseline": base, "candidate": cand,
                              "margin": margin}
    if sequential is not None and not (binary and higher_is_better):
        raise ValueError(f"{metric}: group-sequential scoring is for higher-is-better binary tasks only")
    if binary:
        path = None if sequential is None or unmatched else look_statistics(baseline, candidate, sequential, margin)
        return _binary(b, c, common, levels=levels, floor=floor, chance=chance, sequential=sequential,
                       path=path, recovery=recovery)
    boot = paired_bootstrap(b, c, n_resamples=n_boot, seed=seed)
    # "worse" is up for lower-is-better metrics: non-inferior = the upper bound of delta below +margin
    if higher_is_better:
        p_ni, p_inf = boot.p_lower_above(-margin), boot.p_upper_below(-margin)
    else:
        p_ni, p_inf = boot.p_upper_below(margin), boot.p_lower_above(margin)
    intervals = {level_key(a): [boot.bound("lower", a * BCA_FACTOR), boot.bound("upper", a * BCA_FACTOR)]
                 for a in levels}
    return Comparison(**common, delta=cand - base, method=BCA + ("" if boot.defined else ": undefined here"),
                      p_noninferior=min(1.0, p_ni / BCA_FACTOR), p_inferior=min(1.0, p_inf / BCA_FACTOR),
                      intervals=intervals, recovery=recovery, n_boot=n_boot)


def _binary(b: np.ndarray, c: np.ndarray, common: dict[str, Any], *, levels: Sequence[float], floor: float | None,
            chance: float | None, sequential: SequentialSpec | None, path: list[float] | None,
            recovery: float | None) -> Comparison:
    bb, cc = b[:, 0] == 1, c[:, 0] == 1
    cells = (int(np.sum(bb & cc)), int(np.sum(bb & ~cc)), int(np.sum(~bb & cc)), int(np.sum(~bb & ~cc)))
    return binary_comparison(*cells, common=common, levels=levels, floor=floor, chance=chance,
                             sequential=sequential, path=path, recovery=recovery)


def binary_comparison(a: int, down: int, up: int, d: int, *, common: dict[str, Any], levels: Sequence[float],
                      floor: float | None = None, chance: float | None = None,
                      sequential: SequentialSpec | None = None, path: list[float] | None = None,
                      recovery: float | None = None) -> Comparison:
    """The binary comparison from its four cells (both right, right->wrong, wrong->right, both wrong): what
    `compare` computes after counting, and what the gate's simulations call with enumerated counts."""
    n = a + down + up + d
    margin = common["margin"]
    hib = common["higher_is_better"]
    sgn = 1.0 if hib else -1.0  # accuracy-type binary metrics are higher-is-better; kept general
    delta = (up - down) / n  # exact for 0/1 items, no difference of rounded quotients
    seq_info = None
    if sequential is None or path is None:  # (unmatched items: the gate calls the task inconclusive anyway)
        z = sgn * tango_statistic(n, up, down, -sgn * margin)
        p_ni, p_inf = _sf(z), _sf(-z)
        nominal = {x: x * TANGO_FACTOR for x in levels}
        method = TANGO
    else:
        design = sequential.design
        p_ni, p_inf = design.p_value(path), design.p_value([-z for z in path])
        nominal = {x: rci_level(design, x * TANGO_FACTOR, sequential.stopped_at) for x in levels}
        method = TANGO_SEQ
        total = sequential.looks[-1]
        seq_info = {"looks": list(sequential.looks), "stopped_at": sequential.stopped_at, "z": path,
                    "spending": sequential.spending, "items_scored": n, "items_planned": total,
                    "items_saved": total - n}
    intervals = {}
    for x, nom in nominal.items():
        zq = _N.inv_cdf(1 - nom)
        intervals[level_key(x)] = [tango_bound(n, up, down, zq, "lower"), tango_bound(n, up, down, zq, "upper")]
    extra: dict[str, Any] = {"right_to_wrong": down, "wrong_to_right": up, "mcnemar_p": mcnemar_exact(down, up),
                             "chance": chance}
    if recovery is None and "baseline" in common and common["baseline"]:
        recovery = common["candidate"] / common["baseline"] if hib else None
    if chance is not None:
        extra["p_above_chance"] = p_above_chance(a + down, n, chance)
        if not extra["p_above_chance"] < min(levels):
            recovery = None  # a ratio over a baseline not shown above chance says nothing
    if floor is not None and recovery is not None and hib and a + down > 0:
        # rejection-only: small when the recovery is shown below the floor
        extra["floor"] = floor
        # the ratio score test runs a little liberal too (5.3% at a nominal 5%, n = 300..2000): calibrated alike
        extra["p_below_floor"] = min(1.0, float(_N.cdf(ratio_statistic(a, down, up, d, floor))) / TANGO_FACTOR)
        extra["recovery_upper"] = {level_key(x): ratio_upper(a, down, up, d, _N.inv_cdf(1 - x * TANGO_FACTOR))
                                   for x in levels}
    return Comparison(**common, delta=delta, method=method, p_noninferior=min(1.0, p_ni / TANGO_FACTOR),
                      p_inferior=min(1.0, p_inf / TANGO_FACTOR), intervals=intervals, recovery=recovery,
                      sequential=seq_info, **extra)


def counts_common(a: int, down: int, up: int, d: int, *, metric: str, margin: float) -> dict[str, Any]:
    """The descriptive fields of a higher-is-better binary comparison from its cells (simulations)."""
    n = a + down + up + d
    return {"metric": metric, "higher_is_better": True, "binary": True, "n_items": n, "n_unmatched": 0,
            "baseline": (a + down) / n, "candidate": (a + up) / n, "margin": margin}


def look_statistics(base: dict[str, Item], cand: dict[str, Item], spec: SequentialSpec,
                    margin: float) -> list[float]:
    """Tango's non-inferiority statistic (higher-is-better accuracy) at each look up to spec.stopped_at."""
    out = []
    for j in range(spec.stopped_at + 1):
        ids = spec.order[:spec.looks[j]]
        bb = np.array([base[i][0] == 1 for i in ids])
        cc = np.array([cand[i][0] == 1 for i in ids])
        up, down = int(np.sum(~bb & cc)), int(np.sum(bb & ~cc))
        out.append(float(tango_statistic(len(ids), up, down, -margin)))
    return out


def settle(path: list[float], *, look: int, n_looks: int, design: Design, alpha: float, futility: float) -> str | None:
    """Whether a sequential task is settled at `look` (0-based) at total level alpha: "promote" (crossed the
    efficacy boundary), "fail" (inferiority crossed), "futile" (predictive power of showing non-inferiority
    at the last look below `futility`), or None (score the next look). The futility stop is non-binding: it
    never changes the boundaries, so stopping or not keeps the false-promote rate."""
    bounds = design.boundaries(alpha * TANGO_FACTOR)
    z = path[look]
    if z >= bounds[look]:
        return "promote"
    if -z >= bounds[look]:
        return "fail"
    if look + 1 >= n_looks:
        return None
    if predictive_power(z, design.fractions[look], bounds[-1]) < futility:
        return "futile"
    return None


__all__ = ["BCA", "TANGO", "TANGO_SEQ", "Comparison", "SequentialSpec", "compare", "level_key", "look_statistics",
           "mcnemar_exact", "settle", "tango_interval", "tango_statistic"]
