"""`make bench-gate`: how often the gate promotes, by simulation through its real code.

Binary tasks: paired outcomes are drawn as multinomial counts of (both right, right->wrong, wrong->right,
both wrong) for a true delta, a disagreement rate d and a baseline accuracy p0, for R runs per cell. Each
distinct (n, wrong->right, right->wrong) is decided once by the project's own `qgcore.stats.compare` on an
item set with exactly those counts and `reports.gate.quality_check` (the Tango interval depends on the
counts alone, which tests/unit/test_gate_simulation.py checks), and weighted by how often it was drawn.
Bits/byte: documents with realistic per-byte losses, damage concentrated in 10% of them, BCa over items.

Prints (and writes as JSON) the false-promote rate at the margin per cell, the power at true delta 0 and
-0.5 points, and the smallest drop promoted with 80% power.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from qgcore.stats import compare
from reports.gate import quality_check
from reports.policy import load_policy

SIZES = (100, 150, 273, 600, 1000)  # every n the tool scores: min_items, demo LIMIT, qg_mmlu_dev, qg_stdlib_cont
BENCH_SIZES = (*SIZES, 12032)  # + MMLU-Pro's test split
DISAGREE = (0.02, 0.05, 0.10, 0.20)
BASE_ACC = (0.35, 0.60)


@dataclass(frozen=True)
class Cell:
    family: str
    margin: float
    n: int
    d: float
    p0: float
    true_delta: float

    def probs(self) -> tuple[float, float, float, float] | None:
        """(both right, right->wrong, wrong->right, both wrong), or None where no such pair of models exists."""
        down, up = (self.d - self.true_delta) / 2, (self.d + self.true_delta) / 2
        if up < -1e-12 or down < -1e-12 or down > self.p0 + 1e-12 or up > 1 - self.p0 + 1e-12:
            return None
        up, down = max(up, 0.0), max(down, 0.0)
        return (self.p0 - down, down, up, 1 - self.p0 - up)


@cache
def _passes(n: int, up: int, down: int, margin: float, level: float, min_items: int) -> bool:
    """The real decision for one table: items with exactly these counts through compare + quality_check."""
    base = [1.0] * down + [0.0] * up + [1.0] * (n - up - down)
    cand = [0.0] * down + [1.0] * up + [1.0] * (n - up - down)
    comp = compare({str(i): (b, 1.0) for i, b in enumerate(base)}, {str(i): (c, 1.0) for i, c in enumerate(cand)},
                   metric="acc,none", higher_is_better=True, binary=True, level=level)
    return quality_check("sim", comp.to_dict(), margin, min_items, None).outcome == "pass"


def promote_rate(cell: Cell, runs: int, seed: int, *, level: float = 0.95, min_items: int = 100) -> float | None:
    """Share of `runs` simulated comparisons the gate promotes (quality on this task alone)."""
    probs = cell.probs()
    if probs is None:
        return None
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(cell.n, probs, size=runs)
    tables, weights = np.unique(counts[:, [2, 1]], axis=0, return_counts=True)  # (up, down)
    promoted = 0
    for up in np.unique(tables[:, 0]):
        rows = tables[:, 0] == up
        downs, w = tables[rows, 1], weights[rows]
        limit = _pass_limit(cell.n, int(up), int(downs.min()), int(downs.max()), cell.margin, level, min_items)
        promoted += int(w[downs <= limit].sum())
    return promoted / runs


def _pass_limit(n: int, up: int, lo: int, hi: int, margin: float, level: float, min_items: int) -> int:
    """The largest right->wrong count in [lo, hi] that still passes (lo - 1 if none), by bisection on the real
    decision: for fixed wrong->right counts, more right->wrong never helps (checked exhaustively in
    tests/unit/test_gate_simulation.py), so each drawn table is decided exactly as `_passes` would."""
    if not _passes(n, up, lo, margin, level, min_items):
        return lo - 1
    if _passes(n, up, hi, margin, level, min_items):
        return hi
    good, bad = lo, hi
    while bad - good > 1:
        mid = (good + bad) // 2
        if _passes(n, up, mid, margin, level, min_items):
            good = mid
        else:
            bad = mid
    return good


def binary_grid(margins: dict[str, float], sizes: tuple[int, ...], runs: int, true_delta: str = "margin",
                seed: int = 0) -> list[dict]:
    rows = []
    for family, margin in margins.items():
        for n in sizes:
            for d in DISAGREE:
                for p0 in BASE_ACC:
                    delta = -margin if true_delta == "margin" else float(true_delta)
                    cell = Cell(family, margin, n, d, p0, delta)
                    rate = promote_rate(cell, runs, seed + n + int(d * 1000) + int(p0 * 100))
                    rows.append({"family": family, "margin": margin, "n": n, "d": d, "p0": p0,
                                 "true_delta": delta, "runs": runs, "promote_rate": rate})
    return rows


def smallest_drop_with_power(margin: float, n: int, d: float, p0: float, runs: int, power: float = 0.8) -> float | None:
    """The largest true drop (accuracy, positive) the gate still promotes with `power`, to 0.1 pt, by bisection
    (the promote rate falls as the true drop grows); None if not even a lossless variant reaches `power`."""
    def ok(drop: float) -> bool:
        rate = promote_rate(Cell("", margin, n, d, p0, -drop), runs, 7)
        return rate is not None and rate >= power

    if not ok(0.0):
        return None
    lo, hi = 0, int(round(min(margin, d) * 1000))  # in 0.1-pt steps; a drop beyond d cannot exist
    if ok(hi / 1000):
        return hi / 1000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid / 1000) else (lo, mid)
    return lo / 1000


def bpb_promote_rate(n: int, margin: float, shift: float, runs: int, seed: int, *, damaged_share: float = 0.1,
                     level: float = 0.95) -> float:
    """Bits/byte: true delta `shift` (bits per byte, worse if positive) concentrated in `damaged_share` of docs."""
    rng = np.random.default_rng(seed)
    promoted = 0
    for _ in range(runs):
        nbytes = rng.integers(200, 1500, n).astype(float)
        base_bpb = rng.gamma(20.0, 1.1 / 20.0, n)  # per-document bits/byte around 1.1
        damaged = rng.random(n) < damaged_share
        # excess bits concentrated in the damaged docs; scaled so Σextra/Σbytes = shift in expectation
        extra_bpb = np.where(damaged, rng.exponential(shift / damaged_share, n), 0.0)
        extra_bpb += rng.normal(0, 0.005, n)
        base = {str(i): (base_bpb[i] * nbytes[i], nbytes[i]) for i in range(n)}
        cand = {str(i): ((base_bpb[i] + extra_bpb[i]) * nbytes[i], nbytes[i]) for i in range(n)}
        comp = compare(base, cand, metric="bits_per_byte,none", higher_is_better=False, level=level, n_boot=2000,
                       seed=int(rng.integers(1 << 31)))
        promoted += quality_check("sim", comp.to_dict(), margin, 100, None).outcome == "pass"
    return promoted / runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20000, help="simulated comparisons per binary cell")
    p.add_argument("--bpb-runs", type=int, default=1000, help="simulated comparisons per bits/byte cell")
    p.add_argument("--out", type=Path, default=Path("runs/bench-gate.json"))
    args = p.parse_args(argv)
    policy = load_policy()
    margins = dict(policy.margins)
    t0 = time.perf_counter()
    out: dict = {"runs": args.runs, "bpb_runs": args.bpb_runs, "margins": margins}
    out["false_promote"] = binary_grid(margins, BENCH_SIZES, args.runs)
    worst = max((r for r in out["false_promote"] if r["promote_rate"] is not None), key=lambda r: r["promote_rate"])
    print(f"false promotes at the margin, {len(out['false_promote'])} cells x {args.runs} runs "
          f"(n in {BENCH_SIZES}, d in {DISAGREE}, p0 in {BASE_ACC}): worst {worst['promote_rate']:.2%} "
          f"({worst['family']}, n={worst['n']}, d={worst['d']}, p0={worst['p0']})")
    print(f"{'family':>6} {'n':>6} " + " ".join(f"d={d:<5}" for d in DISAGREE)
          + "   (promote rate at true delta = -margin, p0=0.6)")
    for family in margins:
        for n in BENCH_SIZES:
            cells = {r["d"]: r["promote_rate"] for r in out["false_promote"]
                     if r["family"] == family and r["n"] == n and r["p0"] == 0.6}
            print(f"{family:>6} {n:>6} " + " ".join(f"{'  -   ' if cells[d] is None else f'{cells[d]:6.2%}'}"
                                                    for d in DISAGREE))
    out["power"] = []
    for delta in (0.0, -0.005):
        for row in binary_grid(margins, BENCH_SIZES, args.runs // 4, true_delta=str(delta), seed=11):
            out["power"].append(row)
    print("power (promote rate) at true delta 0 / -0.5 pt, d=5%, p0=0.6:")
    for family in margins:
        for n in BENCH_SIZES:
            pw = [r["promote_rate"] for r in out["power"] if r["family"] == family and r["n"] == n
                  and r["d"] == 0.05 and r["p0"] == 0.6]
            print(f"  {family:>5} n={n:>5}: " + " / ".join(f"{x:.1%}" if x is not None else "-" for x in pw))
    out["smallest_drop_80"] = []
    for family, margin in margins.items():
        for n in (273, 1000, 12032):
            for d in (0.02, 0.05, 0.10):
                drop = smallest_drop_with_power(margin, n, d, 0.6, args.runs // 10)
                out["smallest_drop_80"].append({"family": family, "n": n, "d": d, "drop": drop})
                txt = "none (not even a zero drop)" if drop is None else f"{drop * 100:.1f} pt"
                print(f"  smallest drop promoted with 80% power: {family} n={n} d={d:.0%}: {txt}")
    bpb_margin = policy.metric_margins.get("bits_per_byte", 0.03)
    out["bpb"] = []
    for n in (150, 200, 600):
        for shift, label in ((bpb_margin, "at margin"), (0.0, "no damage")):
            rate = bpb_promote_rate(n, bpb_margin, shift, args.bpb_runs, seed=n)
            out["bpb"].append({"n": n, "shift": shift, "promote_rate": rate, "runs": args.bpb_runs})
            print(f"  bits/byte n={n} {label} (+{shift} bpb, damage in 10% of docs): promote {rate:.1%}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
