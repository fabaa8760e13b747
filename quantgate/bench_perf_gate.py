"""`make bench-perf-gate`: the throughput check's false-reject rate, measured on this machine.

The reference checkpoint is benched against an identical copy of itself ("twin", a variant by name only),
through the bench stage's own servers, sweep and interleaved pairs, and each repetition's ratio interval is
decided by the gate's own performance check (reports.gate, the shipped policy's throughput margin). Two
identical servers must pass: the README quotes the pass rate (the issue's bar: >= 95%). The sweep runs once
per server (capacity does not change between repetitions); what is repeated is exactly what the check
decides on: `repeats` ABAB pairs at the lower of the two capacities, then the interval.
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

from evals.bench_stage import BenchRequest, BenchStage
from evals.perf import ratio_interval
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


def pass_probability(sd: float, level: float, margin: float, pairs: int) -> float:
    """How often two identical servers pass the throughput check at per-pair log-ratio SD `sd`: it passes when
    the t interval's lower end clears log(1 - margin), so at a true ratio of 1 the probability is a noncentral
    t tail (scipy.stats.nct). Sharper than a count of passed blocks, and it says how many pairs would do."""
    from scipy.stats import nct, t

    if not sd > 0:
        return 1.0
    crit = float(t.ppf(0.5 + level / 2, pairs - 1))
    return float(nct.sf(crit, pairs - 1, -math.log(1 - margin) / (sd / math.sqrt(pairs))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-perf-gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-perf-gate"))
    p.add_argument("--repetitions", type=int, default=10, help="independent pair blocks decided by the check")
    p.add_argument("--config", type=Path, default=None,
                   help="bench YAML (default: what `make bench` uses here: evals/bench.cpu.yaml without a GPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="ABAB pairs per block (default: the config's `repeats`, what one bench run decides on)")
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
    if args.repeats is not None:
        stage.cfg = stage.cfg.model_copy(update={"repeats": args.repeats})
    cfg = stage.cfg
    w = cfg.workloads[0]
    ref_m = next(m for m in stage.manifests if m.recipe == record.reference)
    outcomes: list[str] = []
    rows = []
    ref = stage._start(ref_m, None, None)
    try:
        mine = stage._start(twin, None, None)
        try:
            bar = tqdm(desc="sweep", unit="level")
            ref_cap, _ = ref.sweep(w, bar)
            cap, _ = mine.sweep(w, bar)
            bar.close()
            for r in tqdm(range(args.repetitions), desc="pairs", unit="block"):
                pairs = []
                load = min(ref_cap or 1, cap or 1)  # the same load for both, as the bench stage pairs them
                for i in range(cfg.repeats):  # A B A B, as the bench stage runs them
                    a = ref.level(w, load, phase="pair", repeat=i + 1)
                    b = mine.level(w, load, phase="pair", repeat=i + 1)
                    pairs.append((float(a["output_throughput"]), float(b["output_throughput"])))
                ratio = ratio_interval(pairs, cfg.level)
                outcomes.append(decide(ratio, ref_cap, cap))
                rows.append({"repetition": r + 1, "ratio": ratio, "outcome": outcomes[-1]})
        finally:
            mine.stop()
    finally:
        ref.stop()
    passed = outcomes.count("pass") / len(outcomes)
    margin = load_policy()["performance"].throughput_margin
    sd = pooled_log_sd(rows)
    implied = pass_probability(sd, cfg.level, margin, cfg.repeats)
    enough = next((n for n in range(2, 201) if pass_probability(sd, cfg.level, margin, n) >= 0.95), None)
    out = {"model": record.model.model_id, "config": stage.config_name, "capacity": {"reference": ref_cap, TWIN: cap},
           "repeats_per_block": cfg.repeats, "level": cfg.level,
           "throughput_margin": margin, "repetitions": rows, "pass_rate": passed,
           "outcomes": {o: outcomes.count(o) for o in set(outcomes)}, "per_pair_log_sd": sd,
           "implied_pass_rate": implied, "pairs_for_95": enough,
           "seconds": round(time.perf_counter() - t0, 1)}
    (args.runs / "bench-perf-gate.json").write_text(json.dumps(out, indent=1) + "\n")
    ratios = [row["ratio"]["ratio"] for row in rows if row["ratio"]]
    print(f"two identical {record.reference} servers, {len(outcomes)} blocks of {cfg.repeats} ABAB pairs at the lower "
          f"capacity (c={ref_cap} / {cap}): throughput check passed {passed:.0%} ({out['outcomes']}); ratios "
          f"{min(ratios):.3f}..{max(ratios):.3f}; per-pair log-ratio SD {sd:.1%}, implying a {implied:.1%} pass rate "
          f"at {cfg.repeats} pairs ({enough} pairs would pass 95%); {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
