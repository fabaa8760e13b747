"""Group-sequential boundaries: Lan–DeMets alpha spending over K looks, the sequential p-value, and the
repeated-CI level of each look.

Scores arrive in looks (items in a seeded order fixed in advance). At look j the standardized statistic Z_j
(here: Tango's score statistic for non-inferiority) is compared with a boundary c_j such that, under the
null, the chance of crossing at *some* look is the spent alpha. Boundaries come from the canonical joint
distribution of Z_1..Z_K (independent increments, corr(Z_i, Z_j) = sqrt(t_i / t_j)), computed by the
recursive numerical integration of Jennison & Turnbull (2000, ch. 19) on their grid. Efficacy only: a
futility stop (predictive power) is non-binding, so it never changes these boundaries or the error rate.

Not in scipy/statsmodels, so written here and checked against published values (the LD O'Brien–Fleming
boundaries of gsDesign / Jennison & Turnbull, Pocock's constant) and an independent implementation
(scipy's multivariate normal CDF) in tests/unit/test_sequential.py.

The sequential p-value of an observed path is the smallest total alpha at which it would have crossed:
p = min_j a_j with c_j(a_j) = Z_j (each c_j falls as alpha grows). So "promote at level a" is p < a at
any a, which is what Holm's step-down across variants and the intersection over tasks need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

Spending = Literal["obf", "pocock"]
_N01 = NormalDist()


def spent(kind: Spending, alpha: float, t: float) -> float:
    """Lan–DeMets cumulative alpha spent by information fraction t (0 < t <= 1).

    obf: 2 - 2 Phi(z_{alpha/2} / sqrt t) (one-sided form: spends almost nothing early);
    pocock: alpha ln(1 + (e - 1) t) (spends evenly: stops earliest when the answer is clear).
    """
    t = min(max(t, 0.0), 1.0)
    if t == 0:
        return 0.0
    if kind == "obf":
        return float(2.0 * (1.0 - _N01.cdf(_N01.inv_cdf(1.0 - alpha / 2.0) / math.sqrt(t))))
    if kind == "pocock":
        return float(alpha * math.log(1.0 + (math.e - 1.0) * t))
    raise ValueError(f"unknown spending function '{kind}' (use obf or pocock)")


def _grid(mean: float, sd: float, upper: float, r: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Jennison & Turnbull's grid for one look on the score scale (points and Simpson weights), from
    mean - 8 sd up to the continuation bound `upper`."""
    lo = mean - 8.0 * sd
    upper = min(upper, mean + 8.0 * sd)  # an infinite bound (no alpha spent at this look) ends the grid there
    if upper <= lo:
        return np.array([lo]), np.array([0.0])
    # denser near the mean, as J&T sec. 19.2.1 (their x_i, then Simpson midpoints); r = 16 gives the r = 32
    # boundaries to 5 decimals at a third of the cost
    i = np.arange(1, 6 * r)
    x = np.where(i <= r - 1, mean + sd * (-3 - 4 * np.log(r / np.maximum(i, 1))),
                 np.where(i <= 5 * r, mean + sd * (-3 + 3 * (i - r) / (2 * r)),
                          mean + sd * (3 + 4 * np.log(r / np.maximum(6 * r - i, 1)))))
    x = np.concatenate([[lo], x[(x > lo) & (x < upper)], [upper]])
    x = np.unique(x)
    mids = (x[:-1] + x[1:]) / 2
    pts = np.empty(2 * len(x) - 1)
    pts[0::2], pts[1::2] = x, mids
    w = np.zeros_like(pts)
    h = np.diff(x)
    w[0:-1:2] += h / 6
    w[1::2] += 4 * h / 6
    w[2::2] += h / 6
    return pts, w


@dataclass(frozen=True)
class Design:
    """K looks at information fractions `fractions` (the last is 1), efficacy spending `spending`."""

    fractions: tuple[float, ...]
    spending: Spending = "obf"

    def __post_init__(self) -> None:
        f = self.fractions
        if not f or any(b <= a for a, b in zip(f, f[1:], strict=False)) or not 0 < f[0] or abs(f[-1] - 1) > 1e-12:
            raise ValueError(f"look fractions must increase from >0 to 1, got {f}")

    def boundaries(self, alpha: float) -> tuple[float, ...]:
        return _boundaries(self.fractions, self.spending, round(alpha, 15))

    def crossing_probabilities(self, bounds: Sequence[float], drift: float = 0.0) -> list[float]:
        """P(first crossing at look j) for upper bounds `bounds` when E[Z_K] = drift (0: the null)."""
        return _crossings(self.fractions, tuple(bounds), drift)

    def p_value(self, z: Sequence[float]) -> float:
        """Smallest total alpha at which the observed Z_1..Z_J (J <= K looks) crosses some boundary."""
        table = _level_table(self.fractions, self.spending)
        best = 1.0
        for j, zj in enumerate(z):
            if not math.isfinite(zj):
                if zj > 0:
                    return 0.0
                continue
            best = min(best, _level_at(table, j, zj))
        return best


def _continue_density(t_prev: float, pts: np.ndarray, dens: np.ndarray, w: np.ndarray, t: float, upper: float,
                      drift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One step of the recursion on the score scale S = Z sqrt(t) (B-values): the density of S_t on the
    continuation region (below `upper`) and the probability of crossing it."""
    dt = t - t_prev
    sd = math.sqrt(dt)
    cross = float(np.sum(w * dens * norm.sf((upper - pts - drift * dt) / sd)))
    mean = drift * t
    new_pts, new_w = _grid(mean, math.sqrt(t), upper)
    kern = norm.pdf((new_pts[:, None] - pts[None, :] - drift * dt) / sd) / sd
    return new_pts, kern @ (w * dens), new_w, cross


def _first_look(t: float, upper: float, drift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    sd = math.sqrt(t)
    pts, w = _grid(drift * t, sd, upper)
    return pts, norm.pdf((pts - drift * t) / sd) / sd, w, float(norm.sf((upper - drift * t) / sd))


def _crossings(fractions: tuple[float, ...], bounds: tuple[float, ...], drift: float) -> list[float]:
    out = []
    t_prev = 0.0
    pts, dens, w, cross = _first_look(fractions[0], bounds[0] * math.sqrt(fractions[0]), drift)
    for j, (t, c) in enumerate(zip(fractions, bounds, strict=True)):
        if j:
            pts, dens, w, cross = _continue_density(t_prev, pts, dens, w, t, c * math.sqrt(t), drift)
        out.append(cross)
        t_prev = t
    return out


@lru_cache(maxsize=256)
def _boundaries(fractions: tuple[float, ...], spending: Spending, alpha: float) -> tuple[float, ...]:
    bounds: list[float] = []
    t_prev, used = 0.0, 0.0
    target = spent(spending, alpha, fractions[0])
    c = float(norm.isf(target)) if target > 0 else math.inf
    pts, dens, w, cross = _first_look(fractions[0], c * math.sqrt(fractions[0]), 0.0)
    for j, t in enumerate(fractions):
        if j:
            target = spent(spending, alpha, t) - used

            def excess(c: float, pts: np.ndarray = pts, dens: np.ndarray = dens, w: np.ndarray = w,
                       t_prev: float = t_prev, t: float = t, target: float = target) -> float:
                dt = t - t_prev
                return float(np.sum(w * dens * norm.sf((c * math.sqrt(t) - pts) / math.sqrt(dt)))) - target

            c = float(brentq(excess, -10.0, 40.0, xtol=1e-10)) if target > 0 else math.inf
            pts, dens, w, cross = _continue_density(t_prev, pts, dens, w, t, c * math.sqrt(t), 0.0)
        bounds.append(c)
        used += cross
        t_prev = t
    return tuple(bounds)


_LEVELS = np.geomspace(1e-7, 0.5, 161)  # total alphas the p-value is read off (log-interpolated between)


@lru_cache(maxsize=64)
def _level_table(fractions: tuple[float, ...], spending: Spending) -> np.ndarray:
    """Boundaries c_j(a) for a on _LEVELS: rows are levels, columns looks (each column falls as a grows)."""
    return np.array([_boundaries(fractions, spending, float(a)) for a in _LEVELS])


def _level_at(table: np.ndarray, look: int, z: float) -> float:
    """The total alpha a with c_look(a) = z (log-linear interpolation on the table; clamped to its range)."""
    col = table[:, look]
    if z >= col[0]:
        return float(_LEVELS[0]) if z == col[0] else _extrapolate_small(col, z)
    if z < col[-1]:
        return 1.0  # would not cross even at alpha = 0.5: as good as no evidence
    i = int(np.searchsorted(-col, -z))  # col decreasing: first index with col <= z
    a0, a1, c0, c1 = _LEVELS[i - 1], _LEVELS[i], col[i - 1], col[i]
    if not math.isfinite(c0):  # no alpha spent at this look below a1: a1 bounds the p-value (conservative)
        return float(a1)
    frac = (c0 - z) / (c0 - c1) if c0 != c1 else 0.0
    return float(math.exp(math.log(a0) + frac * (math.log(a1) - math.log(a0))))


def _extrapolate_small(col: np.ndarray, z: float) -> float:
    """Beyond the smallest tabulated level: a bound below 1e-7, reported as the tail of a normal at z
    scaled by the first level's ratio (only ever compared with levels >= 1e-4)."""
    return float(min(_LEVELS[0], norm.sf(z) * _LEVELS[0] / max(norm.sf(col[0]), 1e-300)))


def equal_looks(n_items: int, looks: int) -> tuple[int, ...]:
    """Cumulative item counts of `looks` equally sized looks over n_items (the last is n_items)."""
    if looks < 1 or n_items < looks:
        raise ValueError(f"cannot split {n_items} items into {looks} looks")
    return tuple(round(n_items * (j + 1) / looks) for j in range(looks))


def predictive_power(z: float, t: float, final_bound: float) -> float:
    """P(Z_K >= final_bound | Z_t = z) averaged over the drift's posterior under a flat prior (Spiegelhalter,
    Freedman & Blackburn 1986): B_K | B_t ~ N(B_t / t, (1 - t) / t), so PP = Phi((z - c sqrt t) / sqrt(1 - t)).
    Between conditional power at the observed trend (eager: it trusts an early noisy estimate) and at
    "no loss" (it ignores the data, and never stops a task at the margin when much information is left)."""
    if t >= 1:
        return 1.0 if z >= final_bound else 0.0
    return float(norm.cdf((z - final_bound * math.sqrt(t)) / math.sqrt(1 - t)))


def rci_level(design: Design, alpha: float, look: int) -> float:
    """The one-sided nominal level of look `look`'s repeated confidence bound: 1 - Phi(c_look(alpha)).
    The bound at that level holds simultaneously over all looks with probability >= 1 - alpha."""
    return float(norm.sf(design.boundaries(alpha)[look]))



# ---- group-sequential t test (unknown variance): the bench's throughput ratio over interleaved pairs -------

_T_RUNS = 200_000  # null paths the t boundaries are calibrated on (Monte Carlo SE of the error rate ~0.0005)
_T_SEED = 20261201


def _null_t_paths(looks: tuple[int, ...], runs: int, seed: int) -> np.ndarray:
    """t statistics of `runs` standard-normal paths at each look (runs x K), built a look at a time."""
    rng = np.random.default_rng(seed)
    total = np.zeros(runs)
    squares = np.zeros(runs)
    out = np.empty((runs, len(looks)))
    prev = 0
    for j, n in enumerate(looks):
        x = rng.standard_normal((runs, n - prev))
        total += x.sum(axis=1)
        squares += (x * x).sum(axis=1)
        mean = total / n
        sd = np.sqrt(np.maximum(squares - n * mean * mean, 0.0) / (n - 1))
        out[:, j] = mean / (sd / math.sqrt(n))
        prev = n
    return out


def _t_crit(design: Design, looks: tuple[int, ...], alpha: float) -> np.ndarray:
    """The "significance level" t boundaries (Jennison & Turnbull 2000, sec. 11.4): each look's nominal level
    1 - Phi(c_j) of the known-variance design, read off Student's t with that look's degrees of freedom."""
    from scipy.stats import t

    return np.array([float(t.isf(norm.sf(c), n - 1)) for c, n in zip(design.boundaries(alpha), looks, strict=True)])


@lru_cache(maxsize=32)
def t_boundaries(looks: tuple[int, ...], spending: Spending, alpha: float) -> tuple[float, ...]:
    """One-sided critical t values for a group-sequential t test with looks after `looks` observations
    (cumulative). At one look: Student's t quantile, exact. At several, the significance-level boundaries
    spend a little more than alpha at small degrees of freedom (5.15% for 6 looks of 5 pairs at 5%), so
    the spending level they are built at is lowered until a simulation of the test under its null crosses at
    most alpha less two Monte Carlo SEs. One simulation serves every variance: under normal errors the path
    of t statistics is free of sigma. Checked by an independent simulation in tests/unit/test_perf.py."""
    from scipy.stats import t

    if len(looks) == 1:
        return (float(t.isf(alpha, looks[0] - 1)),)
    if looks[0] < 2 or any(b <= a for a, b in zip(looks, looks[1:], strict=False)):
        raise ValueError(f"looks must be increasing counts >= 2, got {looks}")
    design = Design(tuple(n / looks[-1] for n in looks), spending)
    paths = _null_t_paths(looks, _T_RUNS, _T_SEED)
    target = alpha - 2 * math.sqrt(alpha * (1 - alpha) / _T_RUNS)

    def error(a: float) -> float:
        return float(np.mean((paths >= _t_crit(design, looks, a)).any(axis=1)))

    lo, hi = alpha / 4, alpha
    if error(hi) <= target:
        return tuple(_t_crit(design, looks, hi).tolist())
    for _ in range(24):  # bisection on the spending level: error() is a step function of it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if error(mid) <= target else (lo, mid)
    return tuple(_t_crit(design, looks, lo).tolist())


def t_sequential(x: np.ndarray, looks: tuple[int, ...], spending: Spending, alpha: float,
                 null: float) -> dict[str, np.ndarray]:
    """Each row of `x` (runs x observations so far) tested at every complete look against `null` with the
    repeated t interval at `t_boundaries`: a row stops at its first look whose interval excludes `null`
    (above: outcome 1, below: -1); otherwise it is at its last complete look (0). Vectorised, so the bench's
    one decision and the simulations of its error rates are the same code."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    crit = t_boundaries(looks, spending, alpha)
    reached = [j for j, n in enumerate(looks) if n <= x.shape[1]]
    if not reached:
        raise ValueError(f"no complete look: {x.shape[1]} observations, first look at {looks[0]}")
    rows = x.shape[0]
    out = {k: np.zeros(rows) for k in ("mean", "half", "crit")}
    outcome = np.zeros(rows, dtype=int)
    look = np.full(rows, reached[-1])
    done = np.zeros(rows, dtype=bool)
    for j in reached:
        n = looks[j]
        mean = x[:, :n].mean(axis=1)
        half = crit[j] * x[:, :n].std(axis=1, ddof=1) / math.sqrt(n)
        open_ = ~done
        for k, v in (("mean", mean), ("half", half), ("crit", np.full(rows, crit[j]))):
            out[k][open_] = v[open_]
        look[open_] = j
        up, down = open_ & (mean - half > null), open_ & (mean + half < null)
        outcome[up], outcome[down] = 1, -1
        done |= up | down
    return out | {"outcome": outcome, "look": look}
