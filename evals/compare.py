"""Paired comparison of a variant with bf16 on identical items: delta, paired 95% CI, recovery, flips.

Pure functions (numpy only). Every metric is written as a ratio of per-item sums, Σnum/Σden:
accuracy has num = correct (0/1) and den = 1; bits-per-byte has num = -loglik/ln2 and den = bytes.
The CI is a paired bootstrap over items (the same resampled items for both models), which keeps the
correlation between the two models' outcomes: that is what makes small deltas detectable at all.
For binary outcomes an exact McNemar test on the discordant pairs is reported too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Item = tuple[float, float]  # (num, den)


@dataclass(frozen=True)
class Comparison:
    metric: str
    higher_is_better: bool
    n_items: int
    n_unmatched: int  # items present in only one run (excluded)
    baseline: float
    candidate: float
    delta: float  # candidate - baseline, in metric units
    ci_low: float
    ci_high: float
    recovery: float | None  # candidate/baseline (or inverse when lower is better); None if baseline is 0
    right_to_wrong: int | None = None  # binary metrics only
    wrong_to_right: int | None = None
    mcnemar_p: float | None = None
    ci_method: str = "paired bootstrap (percentile)"
    n_boot: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    total = float(den.sum())
    return float(num.sum()) / total if total else float("nan")


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs b (right->wrong) and c (wrong->right)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(
    baseline: dict[str, Item],
    candidate: dict[str, Item],
    *,
    metric: str,
    higher_is_better: bool,
    binary: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """Compare on the items both runs scored. `binary`: outcomes are 0/1 (adds flips and McNemar)."""
    ids = sorted(set(baseline) & set(candidate))
    unmatched = len(set(baseline) ^ set(candidate))
    if not ids:
        raise ValueError(f"{metric}: the two runs share no items; they must be scored on the same items")
    b = np.array([baseline[i] for i in ids], dtype=float)
    c = np.array([candidate[i] for i in ids], dtype=float)
    base, cand = _ratio(b[:, 0], b[:, 1]), _ratio(c[:, 0], c[:, 1])
    delta = cand - base
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    boot = (c[idx, 0].sum(1) / c[idx, 1].sum(1)) - (b[idx, 0].sum(1) / b[idx, 1].sum(1))
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    if higher_is_better:
        recovery = cand / base if base else None
    else:
        recovery = base / cand if cand else None
    extra: dict = {}
    if binary:
        rw = int(np.sum((b[:, 0] == 1) & (c[:, 0] == 0)))
        wr = int(np.sum((b[:, 0] == 0) & (c[:, 0] == 1)))
        extra = {"right_to_wrong": rw, "wrong_to_right": wr, "mcnemar_p": mcnemar_exact(rw, wr)}
    return Comparison(metric=metric, higher_is_better=higher_is_better, n_items=len(ids), n_unmatched=unmatched,
                      baseline=base, candidate=cand, delta=delta, ci_low=float(lo), ci_high=float(hi),
                      recovery=recovery, n_boot=n_boot, **extra)
