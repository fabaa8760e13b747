"""`make bench-gate`: what the gate promises, checked through its own code.

- Accuracy at the margin, *exactly*: the paired trinomial (both the same, right->wrong, wrong->right) at a
  true delta of -margin is enumerated; each table is decided by the project's own comparison
  (qgcore.stats.binary_comparison) and gate check (reports.gate.quality_task_check). For fixed wrong->right
  counts, more right->wrong never helps (tested exhaustively), so the pass region is walked along its
  boundary with real-gate calls. The chance and floor checks are off here: they only ever turn a pass into
  inconclusive or fail, so this is the worst case of every gate configuration.
- Bits/byte, by simulation: documents with realistic per-byte losses and three damage shapes (10% of
  documents damaged; every document, heavy-tailed; 3% catastrophic), BCa over documents as the gate runs it.
- Holm across variants, by simulation through reports.gate.decide (the family-wise rate with k declared).
- Group-sequential scoring, by simulation: the eval stage's own stopping rule (qgcore.stats.settle) at each
  look, the gate's own decision on the sequential comparison; false promotes, power and the share of items
  scored, against fixed n on the same paths.

Prints the tables the README quotes and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binom

from qgcore.quality import QualityPolicy, RecipeGate
from qgcore.sequential import Design, equal_looks
from qgcore.stats import BCA_FACTOR, SequentialSpec, binary_comparison, compare, counts_common, settle, tango_statistic
from reports.gate import Evidence, GatePolicy, decide, quality_task_check
from reports.policy import load_policy

SIZES = (100, 150, 200, 273, 600, 1000, 12032)  # min_items, demo and bench sizes, qg_mmlu_dev, qg_stdlib_cont, MMLU-Pro
DISAGREE = (0.02, 0.05, 0.10, 0.20)
BASE_ACC = (0.35, 0.60)


@dataclass(frozen=True)
class AccuracyCell:
    """A paired binary task: n items, disagreement rate d, reference accuracy p0, true delta."""

    margin: float
    n: int
    d: float
    p0: float
    delta: float

    def probs(self) -> tuple[float, float, float, float] | None:
        """(both right, right->wrong, wrong->right, both wrong), or None where no such pair of models exists."""
        down, up = (self.d - self.delta) / 2, (self.d + self.delta) / 2
        if up < -1e-12 or down < -1e-12 or down > self.p0 + 1e-12 or up > 1 - self.p0 + 1e-12:
            return None
        up, down = max(up, 0.0), max(down, 0.0)
        return (self.p0 - down, down, up, 1 - self.p0 - up)


def gate_passes(a: int, down: int, up: int, d: int, *, margin: float, q: QualityPolicy, level: float,
                chance: float | None = None, floor: float | None = None) -> bool:
    """The real gate's decision on one task with these cells, at one-sided `level`."""
    comp = binary_comparison(a, down, up, d, common=counts_common(a, down, up, d, metric="acc,none", margin=margin),
                             levels=[level], chance=chance, floor=floor)
    return quality_task_check("sim", comp.to_dict(), q, level).outcome == "pass"


def pass_limits(n: int, ups: range, margin: float, level: float, q: QualityPolicy) -> dict[int, int]:
    """For each wrong->right count, the largest right->wrong count the gate still passes (-1: none), walked
    along the boundary with real-gate calls (the limit never falls as wrong->right grows)."""
    @cache
    def passes(up: int, down: int) -> bool:
        rest = n - up - down
        return gate_passes(rest // 2, down, up, rest - rest // 2, margin=margin, q=q, level=level)

    out: dict[int, int] = {}
    limit = -1
    for up in ups:
        limit = min(limit, n - up)
        if limit >= 0 and not passes(up, limit):
            while limit >= 0 and not passes(up, limit):
                limit -= 1
        else:
            while limit + 1 <= n - up and passes(up, limit + 1):
                limit += 1
        out[up] = limit
    return out


def _up_range(cell: AccuracyCell) -> range:
    probs = cell.probs()
    if probs is None:
        return range(0)
    p_up = probs[2]
    if p_up <= 0:
        return range(0, 1)
    return range(int(binom.ppf(1e-11, cell.n, p_up)), int(binom.isf(1e-11, cell.n, p_up)) + 1)


def exact_promote_rate(cell: AccuracyCell, level: float, q: QualityPolicy,
                       limits: dict[int, int] | None = None) -> float | None:
    """P(the gate passes the task) for a variant in `cell`, summed exactly over every table with mass above
    1e-11 (`limits`: pass limits already walked for this n, margin and level)."""
    probs = cell.probs()
    if probs is None:
        return None
    _p11, p_down, p_up, _p00 = probs
    if limits is None:
        limits = pass_limits(cell.n, _up_range(cell), cell.margin, level, q)
    total = 0.0
    for up in _up_range(cell):
        limit = limits[up]
        if limit < 0:
            continue
        w = float(binom.pmf(up, cell.n, p_up)) if p_up > 0 else 1.0
        cond = p_down / (1 - p_up) if p_up < 1 else 0.0
        total += w * float(binom.cdf(limit, cell.n - up, cond))
    return total


def accuracy_grid(q: QualityPolicy, levels: list[float], sizes: tuple[int, ...] = SIZES) -> list[dict[str, Any]]:
    """Exact false-promote rate at the margin in every cell, at every level the gate may use."""
    rows = []
    for family, margin in q.margins.items():
        for level in levels:
            for n in sizes:
                cells = [AccuracyCell(margin, n, d, 0.6, -margin) for d in DISAGREE]
                ups = [r for c in cells for r in (_up_range(c),) if len(r)]
                limits = pass_limits(n, range(min(r.start for r in ups), max(r.stop for r in ups)), margin, level, q)
                for cell in cells:
                    rows.append({"family": family, "margin": margin, "level": level, "n": n, "d": cell.d,
                                 "rate": exact_promote_rate(cell, level, q, limits)})
    return rows


def simulated_promote_rate(cell: AccuracyCell, level: float, q: QualityPolicy, runs: int, seed: int, *,
                           chance: float | None = 0.25, floor: float | None = None) -> float | None:
    """The real gate with its chance and floor checks on: the full four-cell multinomial, simulated."""
    probs = cell.probs()
    if probs is None:
        return None
    counts = np.random.default_rng(seed).multinomial(cell.n, probs, size=runs)
    tables, weights = np.unique(counts, axis=0, return_counts=True)
    ok = sum(int(w) for t, w in zip(tables, weights, strict=True)
             if gate_passes(*map(int, t), margin=cell.margin, q=q, level=level, chance=chance, floor=floor))
    return ok / runs


# ---- bits/byte ---------------------------------------------------------------------------------------------

def bpb_docs(n: int, shift: float, shape: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """Per-document (bits, bytes) of the reference and a variant whose true bits/byte is `shift` worse, with
    the damage `shape`: concentrated (10% of documents), lognormal (every document, heavy-tailed, sigma 1.2),
    catastrophic (3% of documents)."""
    nbytes = rng.integers(200, 1500, n).astype(float)
    base_bpb = rng.gamma(20.0, 1.1 / 20.0, n)
    if shape == "concentrated":
        hit = rng.random(n) < 0.10
        extra = np.where(hit, rng.exponential(shift / 0.10, n), 0.0)
    elif shape == "lognormal":
        extra = rng.lognormal(0.0, 1.2, n)
        extra *= shift / np.exp(1.2**2 / 2)
    elif shape == "catastrophic":
        hit = rng.random(n) < 0.03
        extra = np.where(hit, shift / 0.03, 0.0)
    else:
        raise ValueError(shape)
    extra += rng.normal(0, 0.005, n)
    # rescale so that the realised shift (weighted by bytes) is the true one in expectation, as the margin is
    base = {str(i): (base_bpb[i] * nbytes[i], nbytes[i]) for i in range(n)}
    cand = {str(i): ((base_bpb[i] + extra[i]) * nbytes[i], nbytes[i]) for i in range(n)}
    return base, cand


def bpb_promote_rates(n: int, margin: float, shift: float, shape: str, runs: int, seed: int, *, q: QualityPolicy,
                      levels: list[float]) -> dict[float, float]:
    """How often the real gate check passes a bits/byte task at each one-sided level (one comparison per run
    at every level, as the gate computes it for Holm)."""
    rng = np.random.default_rng(seed)
    promoted = dict.fromkeys(levels, 0)
    for _ in range(runs):
        base, cand = bpb_docs(n, shift, shape, rng)
        comp = compare(base, cand, metric="bits_per_byte,none", higher_is_better=False, margin=margin, levels=levels,
                       n_boot=q.n_boot, seed=int(rng.integers(1 << 31))).to_dict()
        for level in levels:
            promoted[level] += quality_task_check("sim", comp, q, level).outcome == "pass"
    return {level: k / runs for level, k in promoted.items()}


def bpb_promote_rate(n: int, margin: float, shift: float, shape: str, runs: int, seed: int, *, q: QualityPolicy,
                     level: float) -> float:
    return bpb_promote_rates(n, margin, shift, shape, runs, seed, q=q, levels=[level])[level]


# ---- Holm across variants ----------------------------------------------------------------------------------

def family_rate(deltas: list[float], *, n: int, d: float, margin: float, policy: GatePolicy, runs: int,
                seed: int) -> dict[str, float]:
    """k variants (true deltas), one task each, decided together through reports.gate.decide with k declared:
    how often *any* variant at (or beyond) its margin is promoted, and how often each is."""
    q = policy.quality
    rng = np.random.default_rng(seed)
    k = len(deltas)
    wrong = 0
    each = np.zeros(k)
    served = {"status": "served", "engine": "vllm", "tasks": {"t": {"status": "scored"}}}
    levels = q.levels(k)
    for _ in range(runs):
        ev = {}
        for i, delta in enumerate(deltas):
            probs = AccuracyCell(margin, n, d, 0.6, delta).probs()
            assert probs is not None
            a, down, up, dd = (int(x) for x in rng.multinomial(n, probs))
            comp = binary_comparison(a, down, up, dd, common=counts_common(a, down, up, dd, metric="acc,none",
                                                                           margin=margin), levels=levels)
            ev[f"v{i}"] = Evidence(f"v{i}", "8bit", "ref", RecipeGate(), served, served, {"t": comp.to_dict()})
        for i, dec in enumerate(decide(ev, _quality_only(policy), k=k)):
            promoted = dec.verdict == "promote"
            each[i] += promoted
            if promoted and deltas[i] <= -margin + 1e-12:
                wrong += 1
                break
    return {"familywise_false_promote": wrong / runs, **{f"promote_v{i}": each[i] / runs for i in range(k)}}


def _quality_only(policy: GatePolicy) -> GatePolicy:
    """The policy with every non-quality check switched off (the simulation has no bench or divergence)."""
    from reports.gate import CHECKS

    return GatePolicy({name: policy[name] for name in CHECKS if name == "quality"} |
                      {name: _off(policy[name]) for name in CHECKS if name != "quality"})


def _off(section: Any) -> Any:
    fields = section.__dataclass_fields__
    changes: dict[str, Any] = {}
    if "throughput_margin" in fields:
        changes |= {"throughput_margin": None, "require_slo": False}
    if "max_gib" in fields:
        changes["max_gib"] = None
    return replace(section, **changes)


# ---- group-sequential -------------------------------------------------------------------------------------

def sequential_run(n: int, d: float, delta: float, margin: float, q: QualityPolicy, runs: int, seed: int, *,
                   spending: str | None = None, futility: float | None = None, level: float | None = None,
                   looks: int | None = None) -> dict[str, float]:
    """Simulated paths of one task: the eval stage's stopping rule at each look, the gate's decision on the
    sequential comparison; and fixed n on the same paths. Promote rates and the share of items scored."""
    seq = q.sequential
    spending = spending or seq.spending
    futility = seq.futility if futility is None else futility
    level = q.alpha if level is None else level
    k = looks or seq.looks
    looks_at = equal_looks(n, k)
    design = Design(tuple((j + 1) / k for j in range(k)), spending)  # type: ignore[arg-type]
    probs = AccuracyCell(margin, n, d, 0.6, delta).probs()
    if probs is None:
        return {}
    rng = np.random.default_rng(seed)
    prev = 0
    steps = []
    for nj in looks_at:
        steps.append(rng.multinomial(nj - prev, probs, size=runs))
        prev = nj
    cum = np.cumsum(np.stack(steps, axis=1), axis=1)  # [runs, looks, 4]
    promoted = items = fixed = 0
    for r in range(runs):
        path: list[float] = []
        stop = k - 1
        for j in range(k):
            a, down, up, dd = (int(x) for x in cum[r, j])
            path.append(float(tango_statistic(looks_at[j], up, down, -margin)))
            if settle(path, look=j, n_looks=k, design=design, alpha=level, futility=futility) is not None:
                stop = j
                break
        a, down, up, dd = (int(x) for x in cum[r, stop])
        spec = SequentialSpec([], list(looks_at), spending, stop)  # type: ignore[arg-type]
        comp = binary_comparison(a, down, up, dd, common=counts_common(a, down, up, dd, metric="acc,none",
                                                                       margin=margin),
                                 levels=[level], sequential=spec, path=path)
        promoted += quality_task_check("sim", comp.to_dict(), q, level).outcome == "pass"
        items += looks_at[stop]
        a, down, up, dd = (int(x) for x in cum[r, -1])
        fixed += gate_passes(a, down, up, dd, margin=margin, q=q, level=level)
    return {"promote": promoted / runs, "fixed_n_promote": fixed / runs, "items_share": items / (runs * n)}


def sequential_table(q: QualityPolicy, sizes: tuple[int, ...], runs: int, **kw: Any) -> list[dict[str, Any]]:
    rows = []
    margin = q.margins["8bit"]
    for n in sizes:
        for d in (0.02, 0.05, 0.10):
            for name, delta in (("zero", 0.0), ("minus_1pt", -0.01), ("margin", -margin)):
                res = sequential_run(n, d, delta, margin, q, runs, seed=n + int(1000 * d) + int(-1e4 * delta), **kw)
                rows.append({"n": n, "d": d, "delta": delta, "at": name, **res})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bpb-runs", type=int, default=3000, help="simulated comparisons per bits/byte cell")
    p.add_argument("--power-runs", type=int, default=4000, help="simulated comparisons per power cell")
    p.add_argument("--seq-runs", type=int, default=20000, help="simulated paths per sequential cell")
    p.add_argument("--family-runs", type=int, default=4000, help="simulated runs per Holm cell")
    p.add_argument("--out", type=Path, default=Path("runs/bench-gate.json"))
    args = p.parse_args(argv)
    policy = load_policy()
    q = policy.quality
    t0 = time.perf_counter()
    out: dict[str, Any] = {"alpha": q.alpha, "margins": dict(q.margins)}
    levels = [q.alpha / j for j in range(1, 6)]
    out["accuracy_exact"] = accuracy_grid(q, levels)
    print(f"accuracy, exact false promotes at the margin (one-sided levels {', '.join(f'{x:.4g}' for x in levels)}):")
    for level in levels:
        cells = [r for r in out["accuracy_exact"] if r["level"] == level and r["rate"] is not None]
        worst = max(cells, key=lambda r: r["rate"])
        print(f"  level {level:.4g}: worst {worst['rate']:.4%} ({worst['family']}, n={worst['n']}, d={worst['d']}) "
              f"over {len(cells)} feasible cells; worst / level {worst['rate'] / level:.3f}")
    out["power"] = []
    print("power through the real gate (chance rate 1/4 and floors on; promote rate at true delta 0 / -0.5 / -1 pt, "
          "d = 5%, p0 = 0.6, one variant at alpha):")
    for family, margin in q.margins.items():
        for n in SIZES:
            rates = [simulated_promote_rate(AccuracyCell(margin, n, 0.05, 0.6, dl), q.alpha, q, args.power_runs, 11,
                                            floor=q.recovery_min.get(family))  # type: ignore[call-overload]
                     for dl in (0.0, -0.005, -0.01)]
            out["power"].append({"family": family, "n": n, "rates": rates})
            print(f"  {family} n={n:>5}: " + " / ".join("-" if r is None else f"{r:.1%}" for r in rates))
    margin = q.metric_margins["bits_per_byte"]
    out["bpb"] = []
    print(f"bits/byte false promotes at the margin (+{margin}), BCa at {BCA_FACTOR} x the level, {args.bpb_runs} "
          f"runs a cell (rates at one-sided levels {', '.join(f'{x:.4g}' for x in levels)}):")
    for shape in ("concentrated", "lognormal", "catastrophic"):
        for n in (q.min_items["continuous"], 1000):
            rates = bpb_promote_rates(n, margin, margin, shape, args.bpb_runs, seed=n, q=q, levels=levels)
            power = bpb_promote_rates(n, margin, margin / 2, shape, max(args.bpb_runs // 10, 200), seed=n + 1, q=q,
                                      levels=[q.alpha])[q.alpha]
            worst = max(r / a for a, r in rates.items())
            out["bpb"].append({"shape": shape, "n": n, "false_promote": {repr(a): r for a, r in rates.items()},
                               "worst_over_level": worst, "power_half_margin": power})
            print(f"  {shape:>12} n={n}: " + " / ".join(f"{r:.2%}" for r in rates.values()) +
                  f"; worst / level {worst:.2f}; promoted at half the margin {power:.0%}")
    out["holm"] = []
    for deltas in ([-0.02] * 4, [-0.02, -0.02, 0.0, 0.0], [-0.02, 0.0, 0.0, 0.0]):
        for correction in ("holm", "bonferroni"):
            pol = GatePolicy(policy.sections | {"quality": replace(q, multiplicity=correction)})
            res = family_rate(deltas, n=1000, d=0.05, margin=0.02, policy=pol, runs=args.family_runs, seed=3)
            out["holm"].append({"deltas": deltas, "correction": correction} | res)
            lossless = max((res[f"promote_v{i}"] for i, x in enumerate(deltas) if x == 0), default=0)
            print(f"  {correction:>10} deltas {deltas}: family-wise false promote "
                  f"{res['familywise_false_promote']:.2%}; lossless promoted {lossless:.1%}")
    print(f"group-sequential ({q.sequential.looks} looks, {q.sequential.spending}, futility below "
          f"{q.sequential.futility:.0%} predictive power), 8-bit margin, {args.seq_runs} paths a cell:")
    out["sequential"] = {}
    for spending in ("obf", "pocock"):
        rows = sequential_table(q, (1000, q.sequential.min_items, 12032), args.seq_runs, spending=spending)
        out["sequential"][spending] = rows
        for r in rows:
            print(f"  {spending:>6} n={r['n']:>5} d={r['d']:.0%} delta={r['at']:>9}: promote {r['promote']:.2%} "
                  f"(fixed n {r['fixed_n_promote']:.2%}), items scored {r['items_share']:.0%}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"wrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AccuracyCell", "accuracy_grid", "bpb_promote_rate", "exact_promote_rate", "family_rate", "gate_passes",
           "bpb_promote_rates", "pass_limits", "sequential_run", "simulated_promote_rate"]
