"""The quality promise, as data: margins, floors, alpha, the family-wise correction and the sequential
design. Read by the gate (reports.gate) to decide and by the eval stage to stop scoring a task whose
answer is settled; one home, so the two can never disagree on a margin. Stdlib only.

The promise (README "The gate"): the probability that a run promotes *any* variant whose true loss on
some task is at (or beyond) its margin is at most `alpha`. Each task is a one-sided non-inferiority test;
a variant must pass every task (an intersection-union test, so tasks need no correction); variants are
corrected with Holm's step-down over the run's declared recipe set (run.json), never over the folders
that happen to be present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qgcore.vocab import QuantFamily

Multiplicity = Literal["holm", "bonferroni", "none"]
SpendingName = Literal["obf", "pocock"]


@dataclass(frozen=True)
class SequentialPolicy:
    """Group-sequential scoring of binary tasks with at least `min_items` items (README: the threshold
    from which, measured by `make bench-gate`, it scores at most 60% of the items at no loss and keeps
    power within 2 points of fixed n)."""

    __pydantic_config__ = {"extra": "forbid"}
    enabled: bool
    min_items: int  # binary tasks with fewer items are scored at fixed n
    looks: int  # equally sized looks, in a seeded order fixed before the first item is scored
    spending: SpendingName  # Lan–DeMets efficacy spending
    futility: float  # stop a task when its predictive power of passing at the last look falls below this
    order_seed: int = 0

    def __post_init__(self) -> None:
        if self.looks < 2 or self.min_items < self.looks:
            raise ValueError("quality.sequential: looks must be >= 2 and min_items >= looks")
        if not 0 <= self.futility < 0.5:
            raise ValueError("quality.sequential.futility must be in [0, 0.5)")


@dataclass(frozen=True)
class QualityPolicy:
    __pydantic_config__ = {"extra": "forbid"}
    margins: dict[QuantFamily, float]  # family -> non-inferiority margin in metric units (absolute)
    metric_margins: dict[str, float]  # metric name -> its own margin (e.g. bits_per_byte), any family
    recovery_min: dict[QuantFamily, float]  # family -> floor on accuracy recovery; rejection-only
    min_items: dict[Literal["binary", "continuous"], int]  # fewer items decide nothing
    allow_emulated: bool  # an emulated score can at best be inconclusive unless this is true
    alpha: float  # the family-wise false-promote probability of a run
    multiplicity: Multiplicity  # how alpha is shared by the declared variants
    sequential: SequentialPolicy
    n_boot: int = 4000  # bootstrap resamples for continuous metrics

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError("quality.alpha must be in (0, 0.5)")
        if any(m < 0 for m in [*self.margins.values(), *self.metric_margins.values()]):
            raise ValueError("quality margins must be >= 0")
        if any(not 0 < f <= 1 for f in self.recovery_min.values()):
            raise ValueError("quality.recovery_min floors must be in (0, 1]")
        if any(n < 1 for n in self.min_items.values()):
            raise ValueError("quality.min_items must be >= 1")

    def margin_for(self, family: str, metric: str, recipe_margin: float | None = None) -> float:
        """A metric's own margin (e.g. bits_per_byte) wins; else the recipe's, else the family's. Margins
        never leak across metrics: an accuracy margin from a recipe never replaces bits/byte's."""
        base = metric.split(",")[0]
        if base in self.metric_margins:
            return self.metric_margins[base]
        if recipe_margin is not None:
            return recipe_margin
        return self.margins[family]  # type: ignore[index]

    def floor_for(self, family: str, recipe_floor: float | None = None) -> float | None:
        return recipe_floor if recipe_floor is not None else self.recovery_min.get(family)  # type: ignore[call-overload]

    def stopping_level(self, k: int) -> float:
        """The level the eval stage stops at: alpha over the declared variants (each variant's first
        Holm step), so a stop never claims more than the gate can grant."""
        return self.alpha if self.multiplicity == "none" else self.alpha / max(k, 1)

    def levels(self, k: int) -> list[float]:
        """Every one-sided level the gate may test a variant at for k declared variants."""
        if self.multiplicity == "none" or k <= 1:
            return [self.alpha]
        if self.multiplicity == "bonferroni":
            return [self.alpha / k]
        return [self.alpha / j for j in range(k, 0, -1)]


@dataclass(frozen=True)
class RecipeGate:
    """A recipe's own gate section: None means the policy's value for the recipe's family. Declared once
    here; the recipe schema embeds it and the gate reads it from the manifest."""

    __pydantic_config__ = {"extra": "forbid"}
    quality_margin: float | None = None  # replaces the family margin (accuracy-type metrics only)
    recovery_min: float | None = None  # replaces the family recovery floor

    def __post_init__(self) -> None:
        if self.quality_margin is not None and self.quality_margin < 0:
            raise ValueError("gate.quality_margin must be >= 0")
        if self.recovery_min is not None and not 0 < self.recovery_min <= 1:
            raise ValueError("gate.recovery_min must be in (0, 1]")


def holm_levels(pvalues: dict[str, float], k: int, alpha: float, correction: Multiplicity) -> dict[str, float]:
    """Each variant's one-sided test level. Holm's step-down: sort the p-values, test the j-th smallest at
    alpha / (k - j); the first that fails stops the procedure and every later one keeps that level. `k` is
    the declared family (variants that are declared but absent count, as p = 1)."""
    k = max(k, len(pvalues), 1)
    if correction == "none":
        return dict.fromkeys(pvalues, alpha)
    if correction == "bonferroni":
        return dict.fromkeys(pvalues, alpha / k)
    out: dict[str, float] = {}
    order = sorted(pvalues, key=lambda v: (pvalues[v], v))
    for j, v in enumerate(order):
        level = alpha / (k - j)
        out[v] = level
        if not pvalues[v] < level:
            out |= dict.fromkeys(order[j + 1:], level)
            break
    return out


__all__ = ["QualityPolicy", "RecipeGate", "SequentialPolicy", "holm_levels"]
