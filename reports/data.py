"""The verdict from a run folder's artifacts, and the report's data from the verdict (no models, no servers).

The gate (`build_verdict`) reads run.json (the declared family, the target), every variant's manifest,
eval.json (the reference's eval-emulated.json for an emulated variant), divergence.json and bench.json,
verifies every checkpoint against its manifest first, computes each paired comparison with
qgcore.stats at every level Holm may use, and asks reports.gate to decide. verdict.json records the
sha256 of every artifact it read. The report (`build_report_data`) renders from verdict.json and refuses
one whose inputs have changed since: the verdict is built once, by the gate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from qgcore.artifacts import BenchRun, CheckpointManifest, DivergenceRun, EvalRun, RunRecord, Timings
from qgcore.device import Platform
from qgcore.errors import ArtifactError
from qgcore.integrity import verify_files
from qgcore.quality import QualityPolicy, RecipeGate
from qgcore.serving import VariantServing, config_for, deploy_command, plan_serving
from qgcore.stats import Comparison, SequentialSpec, compare
from qgcore.vocab import EMULATED, SCORED, reference_first
from reports.gate import Evidence, GatePolicy, decide, recommend

VERDICT_SCHEMA_VERSION = 3  # 3: one alpha, Holm over the declared family, p-values, sequential, input hashes


def _dump(art: Any) -> dict[str, Any] | None:
    return art.model_dump(mode="json") if art is not None else None


def load_run(run_dir: Path, *, verify: bool = False) -> tuple[RunRecord, dict[str, dict[str, Any]]]:
    """run.json and every variant folder with a manifest: {name: {"manifest", "eval", "bench", "divergence"}},
    the reference first. Each checkpoint is verified against its manifest first (size + mtime, full hashes
    with `verify`): a checkpoint edited after it was measured raises IntegrityError naming the file."""
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder {run_dir} not found: run `make all` (or quantize/eval/bench) first")
    record = RunRecord.read(run_dir / "run.json")
    names = reference_first(sorted(p.parent.name for p in run_dir.glob("*/manifest.json")), record.reference)
    if record.reference not in names:
        raise ArtifactError(f"{run_dir} has no {record.reference}/manifest.json: the reference is required")
    out = {}
    for name in names:
        vdir = run_dir / name
        manifest = CheckpointManifest.read(vdir / "manifest.json")
        verify_files(vdir / manifest.checkpoint_dir, manifest.files, full=verify, what=name)
        out[name] = {"manifest": manifest.model_dump(mode="json"),
                     "eval": _dump(EvalRun.read_optional(vdir / "eval.json")),
                     "bench": _dump(BenchRun.read_optional(vdir / "bench.json")),
                     "divergence": _dump(DivergenceRun.read_optional(vdir / "divergence.json"))}
    out[record.reference]["eval_emulated"] = _dump(EvalRun.read_optional(run_dir / record.reference /
                                                                         "eval-emulated.json"))
    if all(v["eval"] is None for v in out.values()):
        raise ArtifactError(f"{run_dir} has no eval.json: run `make eval` before gating")
    return record, out


def _inputs(run_dir: Path) -> dict[str, str]:
    """sha256 of every artifact the verdict reads (the report refuses a verdict whose inputs changed)."""
    files = [run_dir / "run.json"] + sorted(p for pat in ("*/manifest.json", "*/eval.json", "*/eval-emulated.json",
                                                          "*/bench.json", "*/divergence.json")
                                            for p in run_dir.glob(pat))
    return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _sequential_spec(base: dict[str, Any], cand: dict[str, Any], q: QualityPolicy, where: str) -> SequentialSpec | None:
    bs, cs = base.get("sequential"), cand.get("sequential")
    if not bs or not cs:
        return None
    if bs["order"] != cs["order"] or bs["looks"] != cs["looks"]:
        raise ArtifactError(f"{where}: the variant and the reference were scored in different orders or looks; "
                            "rerun `make eval` for both")
    return SequentialSpec(list(cs["order"]), list(cs["looks"]), q.sequential.spending,
                          min(bs["scored_looks"], cs["scored_looks"]) - 1)


def comparisons(run: dict[str, Any], base: dict[str, Any], family: str, gate: RecipeGate, q: QualityPolicy,
                levels: list[float]) -> dict[str, dict[str, Any]]:
    """Every task both runs scored, compared at each one-sided level in `levels` against its margin."""
    out = {}
    for task, res in (run.get("tasks") or {}).items():
        ref = (base.get("tasks") or {}).get(task)
        if res.get("status") != SCORED or not ref or ref.get("status") != SCORED:
            continue
        metric = res.get("metric") or ""
        binary = bool(res.get("binary"))
        seq = _sequential_spec(ref, res, q, f"{run.get('variant')}/{task}")
        try:
            c: Comparison = compare({k: (v[0], v[1]) for k, v in ref["items"].items()},
                                    {k: (v[0], v[1]) for k, v in res["items"].items()}, metric=metric,
                                    higher_is_better=bool(res.get("higher_is_better", True)),
                                    margin=q.margin_for(family, metric, gate.quality_margin), binary=binary,
                                    levels=levels, floor=q.floor_for(family, gate.recovery_min) if binary else None,
                                    chance=ref.get("chance"), sequential=seq, n_boot=q.n_boot, seed=0)
        except ValueError:
            continue  # no shared items: the gate says so for this task
        out[task] = c.to_dict()
    return out


def _serving(record: RunRecord, name: str, manifest: dict[str, Any], on: Platform) -> VariantServing:
    """How the variant was served, for the deployment: as measured, unless it was measured on a CPU for a GPU
    target without an explicit --tensor-parallel (then TP and GPUs are planned for the target, at the measured
    context)."""
    known = VariantServing(**record.serving[name]) if record.serving.get(name) else None
    if known is not None and (on.kind != "cuda" or known.gpus > 0 or known.sources.get("tensor_parallel") ==
                              "--tensor-parallel"):
        return known
    cap = known.max_model_len if known is not None else None
    return plan_serving(weight_bytes=manifest["bytes_on_disk"], model=manifest.get("architecture") or {}, on=on,
                        max_model_len_cap=cap)


def deploy_line(run_dir: Path, record: RunRecord, name: str, art: dict[str, Any]) -> str:
    """`vllm serve` for a GPU deployment, with the flags that were measured: TP, context, KV dtype, prefix
    caching, and the measured capacity as --max-num-seqs."""
    m = art["manifest"]
    target = Platform(**{k: v for k, v in record.target.items() if k in Platform.__dataclass_fields__})
    seqs = ((art.get("bench") or {}).get("capacity") or {}).get("max_num_seqs")
    cfg = config_for(m.get("serve", {}), _serving(record, name, m, target), target, purpose="bench",
                     max_num_seqs=seqs)
    return deploy_command((run_dir / name / m["checkpoint_dir"]).resolve(), name, cfg)


def build_verdict(run_dir: Path, policy: GatePolicy, *, verify: bool = False) -> dict[str, Any]:
    record, run = load_run(run_dir, verify=verify)
    q = policy.quality
    ref = record.reference
    declared = [n for n in record.declared if n != ref]
    present = [n for n in run if n != ref]
    k = len(set(declared) | set(present))
    levels = q.levels(k)
    evidence = {}
    for name in present:
        art = run[name]
        m, ev = art["manifest"], art["eval"]
        gate = RecipeGate(**(m["recipe_spec"].get("gate") or {}))
        base = run[ref]["eval_emulated"] if ev and ev.get("engine") == EMULATED else run[ref]["eval"]
        comps = comparisons(ev, base, m["family"], gate, q, levels) if ev and base else {}
        evidence[name] = Evidence(name, m["family"], ref, gate, ev, base, comps, art["bench"], run[ref]["bench"],
                                  art["divergence"], m["bytes_on_disk"])
    decisions = decide(evidence, policy, k=k)
    best = recommend(decisions)
    measured_on = next(((a["eval"] or {}).get("platform") for a in run.values() if a["eval"]), None)
    variants = {}
    for d in decisions:
        ev = run[d.variant]["eval"] or {}
        kern = ev.get("kernels") or {}
        variants[d.variant] = d.to_dict() | {
            "comparisons": evidence[d.variant].comparisons,
            "served_as": (kern.get("served_as") or (kern.get("preflight") or {}).get("served_as")),
            "kernels": kern.get("linear"), "status": ev.get("status")}
    return {
        "schema_version": VERDICT_SCHEMA_VERSION, "kind": "verdict", "run": str(run_dir),
        "model": record.model.model_dump(), "reference": ref, "target": record.target, "measured_on": measured_on,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "policy": {name: _plain(section) for name, section in policy.sections.items()},
        "family": {"alpha": q.alpha, "correction": q.multiplicity, "k": k, "declared": declared, "present": present,
                   "levels": {d.variant: d.level for d in decisions},
                   "p_values": {d.variant: d.p_value for d in decisions},
                   "absent": sorted(set(declared) - set(present))},
        "variants": variants,
        "recommended": best.variant if best else None,
        "deploy": {"variant": best.variant, "command": deploy_line(run_dir, record, best.variant, run[best.variant])}
        if best else None,
        "passed": best is not None,
        "inputs": _inputs(run_dir),
    }


def _plain(section: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(section) if is_dataclass(section) else section


def read_verdict(run_dir: Path) -> tuple[dict[str, Any], str]:
    """verdict.json and its sha256; refused when an artifact it was decided on has changed since."""
    path = run_dir / "verdict.json"
    if not path.is_file():
        raise ArtifactError(f"missing {path}: run `make gate` first (the report renders the gate's verdict)")
    raw = path.read_bytes()
    verdict = json.loads(raw)
    if verdict.get("schema_version") != VERDICT_SCHEMA_VERSION:
        raise ArtifactError(f"{path} is schema {verdict.get('schema_version')}, expected {VERDICT_SCHEMA_VERSION}: "
                            "rerun `make gate`")
    now = _inputs(run_dir)
    changed = sorted(f for f in set(now) | set(verdict.get("inputs", {})) if now.get(f) != verdict["inputs"].get(f))
    if changed:
        raise ArtifactError(f"{path} was decided on other artifacts ({changed[0]} changed since): rerun `make gate`")
    return verdict, hashlib.sha256(raw).hexdigest()


def flip_examples(base: dict[str, Any] | None, cand: dict[str, Any], limit: int = 5) -> list[dict[str, Any]]:
    """Items whose correctness flipped, from the eval stage's published examples (choices under the scored
    metric), most confident reference first: a near-tie coin flip differs from confident damage."""
    if not base:
        return []
    b_items, c_items = base.get("items", {}), cand.get("items", {})
    b_ex, c_ex = base.get("examples", {}), cand.get("examples", {})
    out = []
    for doc_id in set(b_items) & set(c_items):
        b_ok, c_ok = b_items[doc_id][0], c_items[doc_id][0]
        if b_ok == c_ok:
            continue
        be, ce = b_ex.get(doc_id, {}), c_ex.get(doc_id, {})
        out.append({"doc_id": doc_id, "direction": "right→wrong" if b_ok else "wrong→right",
                    "question": be.get("question", ""), "target": be.get("target"),
                    "ref_choice": be.get("choice"), "variant_choice": ce.get("choice"),
                    "ref_margin": be.get("margin")})
    out.sort(key=lambda f: (-(f["ref_margin"] or 0.0), f["doc_id"]))
    return out[:limit]


def build_report_data(run_dir: Path) -> dict[str, Any]:
    """What the report shows: the gate's verdict (as written) and, beside it, the artifacts' own tables."""
    verdict, digest = read_verdict(run_dir)
    record, run = load_run(run_dir)
    ref = record.reference
    variants = []
    for name, art in run.items():
        m, ev, bench = art["manifest"], art["eval"] or {}, art["bench"] or {}
        dec = verdict["variants"].get(name)
        base_ev = (run[ref]["eval_emulated"] if ev.get("engine") == EMULATED else run[ref]["eval"]) or {}
        comps = (dec or {}).get("comparisons") or {}
        flips = {task: flip_examples(base_ev.get("tasks", {}).get(task), ev["tasks"][task])
                 for task, c in comps.items() if c.get("right_to_wrong") is not None}
        variants.append({
            "name": name, "is_reference": name == ref, "family": m["family"],
            "description": m["recipe_spec"]["description"], "quantization": m["quantization"],
            "bytes_on_disk": m["bytes_on_disk"], "quantize_seconds": m["wall_seconds"],
            "eval_seconds": ev.get("wall_seconds"), "quantize_peak": m["peak_memory"], "sizing": m.get("sizing"),
            "eval_status": ev.get("status"), "eval_reason": ev.get("reason"), "engine": ev.get("engine"),
            "tasks": ev.get("tasks", {}), "comparisons": comps, "flips": flips, "bench": bench, "decision": dec,
            "divergence": art["divergence"], "server": ev.get("server", {}), "kernels": ev.get("kernels", {}),
            "eval_provenance": ev.get("provenance", {}), "manifest_versions": m["versions"], "device": m["device"],
            "calibration_data": m["calibration_data"], "recipe_hash": m["recipe_hash"],
            "content_key": m["content_key"], "platform": ev.get("platform"),
        })
    timings_art = Timings.read_optional(run_dir / "timings.json")
    heads: dict[str, Any] = {}  # every task any variant has, described by the reference's result where it has one
    for v in variants:
        for task, res in (v["tasks"] or {}).items():
            heads.setdefault(task, res)
    return {"run": str(run_dir), "model": verdict["model"], "verdict": verdict, "verdict_sha256": digest,
            "reference": ref, "variants": variants, "tasks": heads, "created_at": verdict["created_at"],
            "timings": timings(timings_art, variants), "demo": demo_banner(variants)}


def demo_banner(variants: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What of this run was demo-sized, from the artifacts themselves (each records how it was made), so a
    full stage run after `make demo` is never labelled a demo, and a partial one is said to be partial."""
    parts = []
    sized = sorted({json.dumps(v["sizing"], sort_keys=True) for v in variants if v.get("sizing")})
    if sized:
        s = json.loads(sized[0])
        parts.append(f"calibration {s.get('num_samples')} samples x {s.get('seq_len')} tokens and AWQ's scale "
                     f"search on {s.get('grid_points')} grid points (the recipes say 64 x 512 and 20)")
    demo_eval = next((v["eval_provenance"].get("demo") for v in variants if (v["eval_provenance"] or {}).get("demo")),
                     None)
    if demo_eval:
        limits = demo_eval.get("task_limits") or {}
        tasks = ", ".join(f"{t} ({limits.get(t) or demo_eval.get('limit')} items)" for t in demo_eval.get("tasks", []))
        parts.append(f"tasks {tasks}; divergence on {demo_eval.get('divergence_docs')} documents (24 by default)")
    bench = sorted({(v["bench"] or {}).get("settings", {}).get("config") for v in variants} - {None})
    if any("demo" in b for b in bench):
        parts.append(f"bench {', '.join(bench)}")
    if not parts:
        return None
    return {"note": "Demo-sized for a first run on a small machine: " + "; ".join(parts) + ". `make all` runs the "
                    "recipes as written, every item, the full bench."}


def timings(art: Timings | None, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the time went: `quantgate all`'s per-stage wall times and, per variant, the quantize time, the
    eval server's start-up vs scoring, and the bench."""
    rows = []
    for v in variants:
        server = v["server"] or {}
        ev_tasks = sum(t.get("wall_seconds", 0.0) for t in (v["tasks"] or {}).values())
        rows.append({"variant": v["name"], "quantize_seconds": v["quantize_seconds"],
                     "eval_server_startup_seconds": server.get("startup_seconds"),
                     "eval_server_launch_to_ready_seconds": server.get("launch_to_ready_seconds"),
                     "eval_scoring_seconds": round(ev_tasks, 1), "eval_seconds": v.get("eval_seconds"),
                     "bench_seconds": (v["bench"] or {}).get("wall_seconds")})
    return {"stages_seconds": art.stages_seconds if art else {}, "variants": rows}
