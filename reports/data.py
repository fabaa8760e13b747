"""Assemble report data and the verdict from a run folder's JSON artifacts (no models, no servers).

Reads `<run>/<variant>/manifest.json`, `eval.json`, `bench.json` (and lm-eval sample files for flip
examples). Rendering lives in reports/render.py; deciding in reports/gate.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from evals.results import BenchRun, EvalRun
from evals.serve import ServeConfig
from evals.serve import deploy_command as serve_deploy_command
from quantgate.errors import ArtifactError
from quantize.manifest import CheckpointManifest
from reports.gate import GatePolicy, decide_variant, recommend

VERDICT_SCHEMA_VERSION = 1


def _read_optional(cls, path: Path) -> dict[str, Any] | None:  # noqa: ANN001
    return cls.read(path).model_dump(mode="json") if path.is_file() else None


def load_run(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every variant folder with a manifest: {name: {"manifest", "eval", "bench"}}, bf16 first."""
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder {run_dir} not found: run `make all` (or quantize/eval/bench) first")
    names = sorted(p.parent.name for p in run_dir.glob("*/manifest.json"))
    if "bf16" not in names:
        raise ArtifactError(f"{run_dir} has no bf16/manifest.json: the reference is required")
    names.remove("bf16")
    out = {}
    for name in ["bf16", *names]:
        vdir = run_dir / name
        out[name] = {
            "manifest": CheckpointManifest.read(vdir / "manifest.json").model_dump(mode="json"),
            "eval": _read_optional(EvalRun, vdir / "eval.json"),
            "bench": _read_optional(BenchRun, vdir / "bench.json"),
        }
    if all(v["eval"] is None for v in out.values()):
        raise ArtifactError(f"{run_dir} has no eval.json: run `make eval` before gating")
    return out


def deploy_command(run_dir: Path, name: str, manifest: dict[str, Any]) -> str:
    serve = manifest.get("serve", {})
    cfg = ServeConfig(kv_cache_dtype=serve.get("kv_cache_dtype", "auto"), extra_args=serve.get("extra_args", []))
    return serve_deploy_command((run_dir / name / manifest["checkpoint_dir"]).resolve(), name, cfg)


def build_verdict(run_dir: Path, policy: GatePolicy, run: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    run = run or load_run(run_dir)
    base_bench = run["bf16"]["bench"]
    decisions = []
    for name, art in run.items():
        if name == "bf16":
            continue
        m = art["manifest"]
        spec = m["recipe_spec"]
        decisions.append(decide_variant(name, spec["family"], art["eval"], art["bench"], base_bench, policy,
                                        spec.get("gate", {}).get("quality_margin"), m["bytes_on_disk"]))
    best = recommend(decisions)
    return {
        "schema_version": VERDICT_SCHEMA_VERSION,
        "kind": "verdict",
        "run": str(run_dir),
        "model": run["bf16"]["manifest"]["model"],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "policy": policy.__dict__,
        "variants": {d.variant: d.to_dict() for d in decisions},
        "recommended": best.variant if best else None,
        "deploy": {"variant": best.variant, "command": deploy_command(run_dir, best.variant,
                                                                      run[best.variant]["manifest"])}
        if best else None,
        "passed": best is not None,
    }


def _letter(target: Any) -> Any:
    return "ABCDEFGHIJ"[target] if isinstance(target, int) and 0 <= target < 10 else target


def _choice(sample: dict[str, Any]) -> int | None:
    resps = sample.get("filtered_resps") or []
    try:
        lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    except (TypeError, ValueError):
        return None
    return max(range(len(lls)), key=lls.__getitem__) if lls else None


def flip_examples(run_dir: Path, variant: str, task: str, metric: str, limit: int = 3) -> list[dict[str, Any]]:
    """A few items whose correctness flipped between bf16 and the variant, from lm-eval's samples."""
    def read(name: str) -> dict[str, dict]:
        path = run_dir / name / "eval" / "samples" / f"{task}.jsonl"
        if not path.is_file():
            return {}
        return {str(s["doc_id"]): s for s in map(json.loads, path.read_text().splitlines())}

    base, cand = read("bf16"), read(variant)
    out = []
    for doc_id in sorted(set(base) & set(cand), key=lambda x: int(x) if x.isdigit() else x):
        b, c = base[doc_id], cand[doc_id]
        if b.get(metric) is None or b.get(metric) == c.get(metric):
            continue
        doc = c.get("doc") or {}
        letters = "ABCDEFGHIJ"
        bc, cc = _choice(b), _choice(c)
        out.append({
            "doc_id": doc_id, "direction": "right→wrong" if b[metric] else "wrong→right",
            "question": str(doc.get("question", ""))[:240], "target": _letter(c.get("target")),
            "bf16_choice": letters[bc] if bc is not None and bc < 10 else None,
            "variant_choice": letters[cc] if cc is not None and cc < 10 else None,
        })
        if len(out) >= limit:
            break
    return out


def build_report_data(run_dir: Path, policy: GatePolicy) -> dict[str, Any]:
    run = load_run(run_dir)
    verdict = build_verdict(run_dir, policy, run)
    variants = []
    for name, art in run.items():
        m, ev, bench = art["manifest"], art["eval"] or {}, art["bench"] or {}
        flips = {}
        for task, comp in (ev.get("comparisons") or {}).items():
            if comp.get("right_to_wrong") is not None:
                flips[task] = flip_examples(run_dir, name, task, comp["metric"].split(",")[0])
        variants.append({
            "name": name, "family": m["recipe_spec"]["family"], "description": m["recipe_spec"]["description"],
            "quantization": m["quantization"], "bytes_on_disk": m["bytes_on_disk"],
            "quantize_seconds": m["wall_seconds"], "quantize_peak": m["peak_memory"],
            "eval_status": ev.get("status"), "eval_reason": ev.get("reason"), "engine": ev.get("engine"),
            "tasks": ev.get("tasks", {}), "comparisons": ev.get("comparisons", {}), "flips": flips,
            "bench": bench, "decision": verdict["variants"].get(name),
            "server": ev.get("server", {}), "eval_provenance": ev.get("provenance", {}),
            "manifest_versions": m["versions"], "device": m["device"], "calibration_data": m["calibration_data"],
            "recipe_hash": m["recipe_hash"], "content_key": m["content_key"],
        })
    return {"run": str(run_dir), "model": verdict["model"], "verdict": verdict, "variants": variants,
            "created_at": verdict["created_at"]}
