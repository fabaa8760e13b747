"""Assemble report data and the verdict from a run folder's JSON artifacts (no models, no servers).

Reads `<run>/<variant>/manifest.json`, `eval.json` (and `bf16/eval-emulated.json` when a variant was
scored by emulation), `divergence.json`, `bench.json`. Before anything is read as evidence, every checkpoint's files are
verified against its manifest. The verdict recomputes each paired comparison at the family-wise level
from the published per-item results. Rendering lives in reports/render.py; deciding in reports/gate.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from qgcore.artifacts import BenchRun, CheckpointManifest, DivergenceRun, EvalRun
from qgcore.errors import ArtifactError
from qgcore.integrity import verify_files
from qgcore.serving import ServeConfig
from qgcore.serving import deploy_command as serve_deploy_command
from qgcore.stats import compare_runs, familywise_level
from qgcore.vocab import EMULATED
from reports.gate import GatePolicy, RecipeGate, decide_variant, recommend

VERDICT_SCHEMA_VERSION = 2  # 2: family-wise level and interval methods recorded


def _read_optional(cls, path: Path) -> dict[str, Any] | None:  # noqa: ANN001
    return cls.read(path).model_dump(mode="json") if path.is_file() else None


def load_run(run_dir: Path, *, verify: bool = False) -> dict[str, dict[str, Any]]:
    """Every variant folder with a manifest: {name: {"manifest", "eval", "bench"}}, bf16 first.

    Each checkpoint is verified against its manifest first (size + mtime, full hashes with `verify`): a
    checkpoint edited after it was measured raises IntegrityError naming the file.
    """
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder {run_dir} not found: run `make all` (or quantize/eval/bench) first")
    names = sorted(p.parent.name for p in run_dir.glob("*/manifest.json"))
    if "bf16" not in names:
        raise ArtifactError(f"{run_dir} has no bf16/manifest.json: the reference is required")
    names.remove("bf16")
    out = {}
    for name in ["bf16", *names]:
        vdir = run_dir / name
        manifest = CheckpointManifest.read(vdir / "manifest.json")
        verify_files(vdir / manifest.checkpoint_dir, manifest.files, full=verify, what=name)
        out[name] = {
            "manifest": manifest.model_dump(mode="json"),
            "eval": _read_optional(EvalRun, vdir / "eval.json"),
            "bench": _read_optional(BenchRun, vdir / "bench.json"),
            "divergence": _read_optional(DivergenceRun, vdir / "divergence.json"),
        }
    emulated_base = run_dir / "bf16" / "eval-emulated.json"
    out["bf16"]["eval_emulated"] = _read_optional(EvalRun, emulated_base)
    if all(v["eval"] is None for v in out.values()):
        raise ArtifactError(f"{run_dir} has no eval.json: run `make eval` before gating")
    return out


def deploy_command(run_dir: Path, name: str, manifest: dict[str, Any]) -> str:
    cfg = ServeConfig.from_spec(manifest.get("serve", {}))
    return serve_deploy_command((run_dir / name / manifest["checkpoint_dir"]).resolve(), name, cfg)


def gate_evidence(run: dict[str, dict[str, Any]], name: str, level: float) -> dict[str, Any] | None:
    """A variant's eval.json with its comparisons recomputed at `level` against the bf16 run through the
    same engine (vLLM, or the emulated bf16 run for an emulated score)."""
    ev = run[name]["eval"]
    if ev is None or ev.get("status") not in ("ok", "unsupported") or not ev.get("tasks"):
        return ev
    base = run["bf16"]["eval_emulated"] if ev.get("engine") == EMULATED else run["bf16"]["eval"]
    if base is None or base.get("status") != "ok":
        return ev | {"comparisons": {}}
    comps = compare_runs(EvalRun.model_validate(ev), EvalRun.model_validate(base), level=level)
    return ev | {"comparisons": comps}


def build_verdict(run_dir: Path, policy: GatePolicy, run: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    run = run or load_run(run_dir)
    base_bench = run["bf16"]["bench"]
    candidates = [n for n in run if n != "bf16"]
    level = familywise_level(policy.alpha, len(candidates), policy.multiplicity)
    decisions = []
    for name in candidates:
        art = run[name]
        m = art["manifest"]
        spec = m["recipe_spec"]
        recipe_gate = RecipeGate(**{k: spec.get("gate", {}).get(k) for k in ("quality_margin", "recovery_min")})
        decisions.append(decide_variant(name, spec["family"], gate_evidence(run, name, level), art["bench"],
                                        base_bench, policy, recipe_gate, m["bytes_on_disk"], art["divergence"]))
    best = recommend(decisions)
    return {
        "schema_version": VERDICT_SCHEMA_VERSION,
        "kind": "verdict",
        "run": str(run_dir),
        "model": run["bf16"]["manifest"]["model"],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "policy": policy.__dict__,
        "multiplicity": {"correction": policy.multiplicity, "alpha": policy.alpha, "k": len(candidates),
                         "level": level},
        "variants": {d.variant: d.to_dict() for d in decisions},
        "recommended": best.variant if best else None,
        "deploy": {"variant": best.variant, "command": deploy_command(run_dir, best.variant,
                                                                      run[best.variant]["manifest"])}
        if best else None,
        "passed": best is not None,
    }


def flip_examples(base: dict[str, Any] | None, cand: dict[str, Any], limit: int = 5) -> list[dict[str, Any]]:
    """Items whose correctness flipped, from the eval stage's published examples (choices under the scored
    metric), most confident bf16 first: a near-tie coin flip differs from confident damage."""
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
                    "bf16_choice": be.get("choice"), "variant_choice": ce.get("choice"),
                    "bf16_margin": be.get("margin")})
    out.sort(key=lambda f: -(f["bf16_margin"] or 0.0))
    return out[:limit]


def build_report_data(run_dir: Path, policy: GatePolicy, *, verify: bool = False) -> dict[str, Any]:
    run = load_run(run_dir, verify=verify)
    verdict = build_verdict(run_dir, policy, run)
    variants = []
    for name, art in run.items():
        m, ev, bench = art["manifest"], art["eval"] or {}, art["bench"] or {}
        flips = {}
        base_ev = (run["bf16"]["eval_emulated"] if ev.get("engine") == EMULATED else run["bf16"]["eval"]) or {}
        for task, comp in (ev.get("comparisons") or {}).items():
            if comp.get("right_to_wrong") is not None:
                flips[task] = flip_examples(base_ev.get("tasks", {}).get(task), ev["tasks"][task])
        variants.append({
            "name": name, "family": m["recipe_spec"]["family"], "description": m["recipe_spec"]["description"],
            "quantization": m["quantization"], "bytes_on_disk": m["bytes_on_disk"],
            "quantize_seconds": m["wall_seconds"], "eval_seconds": ev.get("wall_seconds"),
            "quantize_peak": m["peak_memory"],
            "eval_status": ev.get("status"), "eval_reason": ev.get("reason"), "engine": ev.get("engine"),
            "tasks": ev.get("tasks", {}), "comparisons": ev.get("comparisons", {}), "flips": flips,
            "bench": bench, "decision": verdict["variants"].get(name), "divergence": art["divergence"],
            "server": ev.get("server", {}), "eval_provenance": ev.get("provenance", {}),
            "manifest_versions": m["versions"], "device": m["device"], "calibration_data": m["calibration_data"],
            "recipe_hash": m["recipe_hash"], "content_key": m["content_key"],
        })
    return {"run": str(run_dir), "model": verdict["model"], "verdict": verdict, "variants": variants,
            "created_at": verdict["created_at"], "timings": timings(run_dir, variants),
            "demo": json.loads((run_dir / "demo.json").read_text()) if (run_dir / "demo.json").is_file() else None}


def timings(run_dir: Path, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the time went: `quantgate all`'s per-stage wall times (timings.json) and, per variant, the
    quantize time, the eval server's start-up vs scoring, and the bench."""
    path = run_dir / "timings.json"
    stages = json.loads(path.read_text()).get("stages_seconds", {}) if path.is_file() else {}
    rows = []
    for v in variants:
        server = v["server"] or {}
        ev_tasks = sum(t.get("wall_seconds", 0.0) for t in (v["tasks"] or {}).values())
        # start-up waited for in this variant's eval, and from launch (it may overlap the previous variant)
        rows.append({"variant": v["name"], "quantize_seconds": v["quantize_seconds"],
                     "eval_server_startup_seconds": server.get("startup_seconds"),
                     "eval_server_launch_to_ready_seconds": server.get("launch_to_ready_seconds"),
                     "eval_scoring_seconds": round(ev_tasks, 1), "eval_seconds": v.get("eval_seconds"),
                     "bench_seconds": (v["bench"] or {}).get("wall_seconds")})
    return {"stages_seconds": stages, "variants": rows}
