"""GPU checks, run on a lent CUDA machine (`scripts/device-gpu-tests.sh`); skipped by capability elsewhere.

- the quantize CLI on CUDA for all six recipes on a ~0.5B random Llama, with per-recipe time and peak CUDA
  memory recorded in each manifest, and TARGET_GPU=9.0 (Hopper): NVFP4's weight-only fallback is noted;
- the emulated-scoring path (transformers' compressed-tensors decompression through lm-eval) on CUDA;
- NVML per-process accounting of a real CUDA process tree (what the bench reports as the server's memory).

With QUANTGATE_GPU_OUT set, a JSON summary of what was measured is written there (the README quotes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (capability-gated)")]
RECIPES = ("bf16", "fp8", "fp8-kv", "awq-4", "gptq-4", "nvfp4")
SUMMARY: dict = {}


def _record(key: str, value) -> None:  # noqa: ANN001
    SUMMARY[key] = value
    out = os.environ.get("QUANTGATE_GPU_OUT")
    if out:
        Path(out).write_text(json.dumps(SUMMARY, indent=1) + "\n")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory):
    from quantgate.cli import main
    from tests.conftest import build_tiny_llama

    # ~0.5B parameters: 16 layers of width 1536 (GQA 24/8 heads), MLP 4096, 32k vocabulary
    model = build_tiny_llama(tmp_path_factory.mktemp("m") / "llama-0.5b", hidden=1536, intermediate=4096, layers=16,
                             heads=24, kv_heads=8, vocab=32000)
    runs = tmp_path_factory.mktemp("runs")
    started = time.perf_counter()
    rc = main(["quantize", "--model", str(model), "--runs", str(runs), "--target-gpu", "9.0"])
    return {"rc": rc, "runs": runs, "run_dir": runs / model.name, "model": model,
            "seconds": time.perf_counter() - started}


def test_six_recipes_quantize_on_cuda_with_time_and_peak_memory(quantized):
    from qgcore.artifacts import CheckpointManifest

    assert quantized["rc"] == 0
    rows = {}
    for name in RECIPES:
        m = CheckpointManifest.read(quantized["run_dir"] / name / "manifest.json")
        assert m.device["device"] == "cuda" and float(m.device["compute_capability"]) >= 8.0
        if name != "bf16":
            assert m.peak_memory["cuda_max_allocated_bytes"] > 100 * 2**20, name
        rows[name] = {"wall_seconds": m.wall_seconds, "cuda_peak_gib": round(m.peak_memory.get(
            "cuda_max_allocated_bytes", 0) / 2**30, 2), "rss_peak_gib": round(m.peak_memory["rss_bytes"] / 2**30, 2),
            "mib_on_disk": round(m.bytes_on_disk / 2**20, 1), "gpu": m.device.get("gpu"),
            "fallback": m.device.get("fallback")}
    _record("quantize", {"recipes": rows, "total_seconds": round(quantized["seconds"], 1)})
    assert rows["nvfp4"]["fallback"] and "weight-only" in rows["nvfp4"]["fallback"]  # 9.0 < NVFP4's native 10.0
    assert rows["fp8"]["fallback"] is None  # FP8 is native on Hopper
    assert rows["gptq-4"]["mib_on_disk"] < rows["fp8"]["mib_on_disk"] < rows["bf16"]["mib_on_disk"]


def test_emulated_scoring_runs_on_cuda(quantized):
    """The emulation engine (transformers + compressed-tensors decompression, through lm-eval's hf backend) on
    CUDA, driven by the eval stage's own session code; the comparison by the gate's own engine."""
    from evals.scoring import Variant, Work, score_session
    from evals.stage import EvalRequest, EvalStage
    from qgcore.artifacts import CheckpointManifest
    from qgcore.stats import compare
    from qgcore.vocab import EMULATED
    from quantgate.context import resolve

    ctx = resolve(runs_root=quantized["runs"], model=str(quantized["model"]))
    assert ctx.platform.kind == "cuda"
    task = "qg_stdlib_ppl"
    stage = EvalStage(ctx, EvalRequest(tasks=[task], limit=40, divergence_docs=0), quiet=True)
    spec = stage.spec(task).fixed()
    runs, seconds = {}, {}
    for name in ("bf16", "nvfp4"):
        v = Variant(CheckpointManifest.read(quantized["run_dir"] / name / "manifest.json"), ctx, EMULATED)
        started = time.perf_counter()
        res = score_session(v, Work(name, EMULATED, {task: None}), {task: spec}, stage.index, None)
        seconds[name] = round(time.perf_counter() - started, 1)
        assert res.status == "served"
        runs[name] = v.saved(stage.key_spec(task, EMULATED))
        assert runs[name] is not None and runs[name].status == "scored" and runs[name].engine == EMULATED
        assert "cuda" in v.flags()
    items = {n: {k: (x[0], x[1]) for k, x in r.items.items()} for n, r in runs.items()}
    comp = compare(items["bf16"], items["nvfp4"], metric="bits_per_byte,none", higher_is_better=False, margin=0.03)
    _record("emulated_cuda", {n: {"bits_per_byte": r.value, "seconds": seconds[n]} for n, r in runs.items()}
            | {"delta": comp.delta, "interval_at_5pct": comp.intervals})
    assert comp.n_items == 40 and comp.delta != 0.0  # a 4-bit copy of random weights scores differently


def test_nvml_reads_a_real_cuda_process_tree_not_the_whole_device():
    from qgcore.memory import PeakGPU, tree_gpu_bytes, tree_pids

    child = subprocess.Popen([sys.executable, "-c", (
        "import time, torch; x = torch.empty(3 << 30, dtype=torch.uint8, device='cuda'); "
        "print('ready', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        wrapper_pid = child.pid
        with PeakGPU(wrapper_pid, interval=0.2) as peak:
            time.sleep(1.0)
        used = tree_gpu_bytes(wrapper_pid)
        _record("nvml_diagnostics", _nvml_pids() | {"tree": sorted(tree_pids(wrapper_pid)), "used": used})
        assert used is not None and 3 * 2**30 <= used < 6 * 2**30  # 3 GiB tensor + the CUDA context
        assert peak.peak_bytes >= 3 * 2**30 and peak.samples >= 3
        other = subprocess.Popen(["sleep", "30"])
        try:
            assert tree_gpu_bytes(other.pid) == 0  # an unrelated process tree holds none of it
        finally:
            other.kill()
        _record("nvml", {"child_tree_gib": round(used / 2**30, 2), "samples": peak.samples})
    finally:
        child.kill()


def _nvml_pids() -> dict:
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {"nvml": [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]}
    finally:
        pynvml.nvmlShutdown()
