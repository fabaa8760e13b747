"""`make bench-perf-gate`: the throughput check's false-reject rate, measured on this machine.

The reference checkpoint is benched against an identical copy of itself ("twin", a variant by name only),
through the bench stage's own servers, sweep and interleaved pairs, and each repetition's ratio interval is
decided by the gate's own performance check (reports.gate, the shipped policy's throughput margin). Two
identical servers must pass: the README quotes the pass rate (the issue's bar: >= 95%). The sweep runs once
per server (capacity does not change between repetitions); what is repeated is exactly what the check
decides on: the bench stage's own pair loop (evals.bench_stage.run_pairs: looks of `repeats` ABAB pairs at
the lower of the two capacities until the repeated interval decides the margin), then the interval.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals.bench_stage import BenchRequest, BenchStage, run_pairs
from evals.perf import BenchConfig
from qgcore.artifacts import CheckpointManifest
from qgcore.quality import RecipeGate
from quantgate.cli import main as cli
from quantgate.context import record_run, resolve
from quantize.recipe import load_recipes
from reports.gate import CHECKS, Evidence
from reports.policy import load_policy

TWIN = "twin"


def make_twin(run_dir: Path, reference: str, *, name: str = TWIN, family: str = "8bit") -> CheckpointManifest:
    """The reference's checkpoint under another name and family: its files are the reference's (copied, the
    same bytes), so any difference measured between the two is the measurement's own."""
    src = CheckpointManifest.read(run_dir / reference / "manifest.json")
    dst = run_dir / name
    if not (dst / src.checkpoint_dir).is_dir():
        shutil.copytree(run_dir / reference / src.checkpoint_dir, dst / src.checkpoint_dir)
    spec = src.recipe_spec | {"name": name, "family": family}
    twin = src.model_copy(update={"recipe": name, "family": family, "recipe_spec": spec,
                                  "content_key": f"{src.content_key}-{name}"})
    twin.write(dst / "manifest.json")
    return twin


def decide(ratio: dict[str, Any] | None, ref_cap: int | None, cap: int | None) -> str:
    """The gate's own throughput check on one repetition's pairs."""
    policy = load_policy()
    section = policy["performance"]
    bench = {"status": "served", "capacity": {"load": cap, "load_kind": "concurrency"},
             "throughput_vs_reference": ratio, "slo": {}}
    ev = Evidence(TWIN, "8bit", "reference", RecipeGate(), None, None, {}, bench,
                  {"status": "served", "capacity": {"load": ref_cap, "load_kind": "concurrency"}})
    checks = CHECKS["performance"].run(ev, section, policy.quality.alpha)
    return next(c.outcome for c in checks if c.name == "performance:throughput")


def pooled_log_sd(rows: list[dict[str, Any]]) -> float:
    """The per-pair log-ratio SD, pooled within blocks (drift between blocks does not count)."""
    sq, df = 0.0, 0
    for row in rows:
        logs = [math.log(x) for x in (row["ratio"] or {}).get("per_pair", [])]
        if len(logs) > 1:
            mean = sum(logs) / len(logs)
            sq += sum((v - mean) ** 2 for v in logs)
            df += len(logs) - 1
    return math.sqrt(sq / df) if df else math.nan


def pass_probability(sd: float, cfg: BenchConfig, margin: float, runs: int = 40_000, seed: int = 0) -> dict[str, float]:
    """How often two identical servers pass the throughput check at per-pair log-ratio SD `sd`, and the pairs
    it takes on average: normal log ratios around 0 decided by the same vectorised rule the bench stops by
    (qgcore.sequential.t_sequential at the config's looks). Sharper than a count of passed blocks."""
    import numpy as np

    from qgcore.sequential import t_sequential

    looks = cfg.pair_design()
    if not sd > 0:
        return {"pass": 1.0, "mean_pairs": float(looks[0])}
    x = np.random.default_rng(seed).normal(0.0, sd, (runs, looks[-1]))
    got = t_sequential(x, looks, cfg.pair_spending, (1 - cfg.level) / 2, math.log(1 - margin))
    return {"pass": float(np.mean(got["outcome"] == 1)), "mean_pairs": float(np.mean(np.array(looks)[got["look"]]))}


def summarize(meta: dict[str, Any], rows: list[dict[str, Any]], cfg: BenchConfig, margin: float,
              t0: float) -> dict[str, Any]:
    outcomes = [row["outcome"] for row in rows]
    sd = pooled_log_sd(rows)
    implied = pass_probability(sd, cfg, margin)
    # the looks of `repeats` pairs that would pass 95% at this noise (the config's `pair_looks` to set)
    enough = next((k for k in range(1, 21)
                   if pass_probability(sd, cfg.model_copy(update={"pair_looks": k}), margin)["pass"] >= 0.95), None)
    pairs_run = [row["ratio"]["pairs"] for row in rows if row["ratio"]]
    return meta | {"repetitions": rows, "pass_rate": outcomes.count("pass") / len(outcomes),
                   "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
                   "mean_pairs": sum(pairs_run) / max(len(pairs_run), 1), "per_pair_log_sd": sd,
                   "implied": implied, "looks_for_95": enough, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-perf-gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-perf-gate"))
    p.add_argument("--repetitions", type=int, default=10, help="independent pair blocks decided by the check")
    p.add_argument("--config", type=Path, default=None,
                   help="bench YAML (default: what `make bench` uses here: evals/bench.cpu.yaml without a GPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="ABAB pairs per look (default: the config's `repeats`, what one bench run decides on)")
    p.add_argument("--pair-looks", type=int, default=None,
                   help="most looks per block (default: the config's `pair_looks`; 1 = a fixed `repeats` pairs)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    reference = next(r.name for r in load_recipes(None) if r.family == "reference")
    if cli(["quantize", "--recipes", reference, "--runs", str(args.runs)] +
           (["--model", args.model] if args.model else [])) != 0:
        return 1
    ctx = resolve(runs_root=args.runs, model=args.model)
    record = record_run(ctx)
    twin = make_twin(ctx.run_dir, record.reference)
    record_run(ctx, declared=[TWIN], families={TWIN: "8bit"})
    stage = BenchStage(ctx, BenchRequest(config_path=args.config), quiet=True)
    for key, value in (("repeats", args.repeats), ("pair_looks", args.pair_looks)):
        if value is not None:
            stage.cfg = stage.cfg.model_copy(update={key: value})
    cfg = stage.cfg
    margin = load_policy()["performance"].throughput_margin
    meta = {"model": record.model.model_id, "config": stage.config_name, "repeats_per_look": cfg.repeats,
            "pair_looks": cfg.pair_looks, "pair_spending": cfg.pair_spending, "level": cfg.level,
            "throughput_margin": margin}
    w = cfg.workloads[0]
    ref_m = next(m for m in stage.manifests if m.recipe == record.reference)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    ref = stage._start(ref_m, None, None)
    try:
        mine = stage._start(twin, None, None)
        try:
            bar = tqdm(desc="sweep", unit="level")
            ref_cap, _ = ref.sweep(w, bar)
            cap, _ = mine.sweep(w, bar)
            bar.close()
            load = min(ref_cap or 1, cap or 1)  # the same load for both, as the bench stage pairs them
            for r in tqdm(range(args.repetitions), desc="pairs", unit="block"):
                ratio, _ = run_pairs(lambda i: ref.level(w, load, phase="pair", repeat=i),
                                     lambda i: mine.level(w, load, phase="pair", repeat=i), cfg, margin)
                rows.append({"repetition": r + 1, "ratio": ratio, "outcome": decide(ratio, ref_cap, cap)})
                out = summarize(meta | {"capacity": {"reference": ref_cap, TWIN: cap}}, rows, cfg, margin, t0)
                (args.runs / "bench-perf-gate.json").write_text(json.dumps(out, indent=1) + "\n")  # each block kept
        finally:
            mine.stop()
    finally:
        ref.stop()
    passed, sd, implied, enough = out["pass_rate"], out["per_pair_log_sd"], out["implied"], out["looks_for_95"]
    ratios = [row["ratio"]["ratio"] for row in rows if row["ratio"]]
    print(f"two identical {record.reference} servers, {len(rows)} blocks of up to {cfg.pair_looks} looks of "
          f"{cfg.repeats} ABAB pairs at the lower capacity (c={ref_cap} / {cap}): throughput check passed "
          f"{passed:.0%} ({out['outcomes']}) after {out['mean_pairs']:.1f} pairs on average; ratios "
          f"{min(ratios):.3f}..{max(ratios):.3f}; per-pair log-ratio SD {sd:.1%}, implying a {implied['pass']:.1%} "
          f"pass rate after {implied['mean_pairs']:.1f} pairs ({enough} looks would pass 95%); {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
