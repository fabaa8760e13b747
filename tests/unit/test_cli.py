"""Every bad input: one clear line, a distinct exit code, nothing lost; every option reaches its stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from qgcore.artifacts import RunRecord
from qgcore.errors import EXIT_CODES
from qgcore.paths import DEFAULT_SLUG
from quantgate.cli import build_parser, main
from tests.helpers.artifacts import write_manifest


def err_of(capsys) -> str:
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", ["quantize", "eval", "bench", "report", "gate", "deploy", "all", "plan"])
def test_every_subcommand_help_lists_the_exit_codes(capsys, command):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    for code, text in EXIT_CODES.items():
        assert f"{code}  {text}" in out, (command, code)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--recipes", "--runs", "--target-gpu", "--force"):
        assert opt in out
    for code, text in EXIT_CODES.items():
        assert f"{code}  {text}" in out


def test_every_error_class_has_a_documented_code_and_input_errors_are_not_tool_errors():
    import qgcore.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.QuantgateError)]
    assert len(classes) >= 9
    for cls in classes:
        assert cls.exit_code in EXIT_CODES, cls
    inputs = (errors.ConfigError, errors.ModelNotFoundError, errors.HubUnreachableError, errors.GroupSizeError,
              errors.UnsupportedHardwareError, errors.NoSpaceError)
    codes = [c.exit_code for c in inputs]
    assert len(set(codes)) == len(codes) and errors.EXIT_ERROR not in codes and errors.EXIT_GATE_REJECTED not in codes


def test_unknown_recipe(capsys):
    assert main(["quantize", "--recipes", "bf16,gptq4"]) == 3
    err = err_of(capsys)
    assert "Unknown recipe 'gptq4'. Did you mean: gptq-4?" in err and len(err.splitlines()) == 1


def test_model_path_not_found(capsys, tmp_path):
    assert main(["quantize", "--model", str(tmp_path / "nope"), "--runs", str(tmp_path)]) == 4
    assert "not found" in err_of(capsys)


def test_folder_without_config(capsys, tmp_path):
    assert main(["quantize", "--model", str(tmp_path), "--runs", str(tmp_path)]) == 4
    assert "no config.json" in err_of(capsys)


def test_hub_unreachable_suggests_local_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["quantize", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--runs", str(tmp_path)]) == 5
    err = err_of(capsys)
    assert "cannot reach the Hugging Face Hub" in err and "MODEL=/path/to/model" in err



def test_target_gpu_cannot_run_scheme(capsys, tmp_path, tiny_model):
    """Checked on the model's own layers with vLLM's rules before any work: vLLM serves no bfloat16 model on a
    T4 (cc 7.5), and every checkpoint here is bf16 underneath, so it refuses; nothing is written."""
    runs = tmp_path / "runs"
    args = ["quantize", "--model", str(tiny_model), "--recipes", "nvfp4", "--target-gpu", "T4", "--runs", str(runs)]
    assert main(args) == 7
    err = err_of(capsys)
    assert err.startswith("quantgate: error: recipe 'nvfp4' cannot be served on T4, cc 7.5") and \
        len(err.splitlines()) == 1
    assert "bfloat16 needs compute capability 8.0" in err and "drop it from RECIPES or pick another TARGET_GPU" in err
    assert not runs.exists()
    assert main(["quantize", "--recipes", "fp8", "--target-gpu", "H10", "--runs", str(runs)]) == 3
    assert "Did you mean: H100" in err_of(capsys)


def test_bad_recipe_yaml(capsys, tmp_path):
    p = tmp_path / "fp8x.yaml"
    p.write_text("name: fp8x\ndescription: d\nfamily: 8bit\nquant:\n  scheme: fp8_dynamic\n  ignor: [lm_head]\n")
    assert main(["quantize", "--recipes", str(p), "--runs", str(tmp_path)]) == 3
    assert "quant.ignor: unknown key" in err_of(capsys)


def test_bad_usage_is_config_error(capsys):
    assert main(["quantize", "--no-such-flag"]) == 3


# ---- eval / bench / all: the run must exist; bad values are config errors ----------------------------------------

@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """A runs/ root holding the default model's run with two built variants (what `quantize` leaves)."""
    for name in ("bf16", "fp8"):
        write_manifest(tmp_path / DEFAULT_SLUG, name)
    return tmp_path


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_without_quantize_output(capsys, tmp_path, command):
    assert main([command, "--model", str(tmp_path / "x"), "--runs", str(tmp_path)]) == 1
    err = err_of(capsys)
    assert "run `make quantize` first" in err and len(err.splitlines()) == 1


def test_bench_bad_config(capsys, run_root: Path):
    p = run_root / "b.yaml"
    p.write_text("slo: {ttft_p95_s: -1}\n")
    assert main(["bench", "--config", str(p), "--runs", str(run_root)]) == 3
    err = err_of(capsys)
    assert "slo.ttft_p95_s" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("argv", "needle"), [
    (["eval", "--tensor-parallel", "3"], "--tensor-parallel '3': sizes must be powers of two"),
    (["eval", "--tensor-parallel", "bf16=two"], "--tensor-parallel 'bf16=two': give N or name=N"),
    (["bench", "--tensor-parallel", "6"], "--tensor-parallel '6'"),
    (["eval", "--max-model-len", "8"], "--max-model-len 8: give a context of at least 16 tokens"),
    (["bench", "--startup-timeout", "0"], "--startup-timeout 0.0: give seconds > 0"),
    (["eval", "--divergence-tokens", "1"], "--divergence-tokens 1: give a count >= 2"),
    (["eval", "--divergence-docs", "-1"], "--divergence-docs -1: give a count >= 0"),
    (["eval", "--limit", "0"], "--limit 0: give a count >= 1"),
    (["bench", "--max-load", "0"], "--max-load 0: give a count >= 1"),
    (["eval", "--policy", "missing.yaml"], "gate policy not found: missing.yaml"),
    (["all", "--max-load", "0"], "--max-load 0: give a count >= 1"),
    (["all", "--tensor-parallel", "3"], "--tensor-parallel '3'"),
])
def test_bad_option_values_are_config_errors(capsys, run_root: Path, argv, needle):
    assert main([*argv, "--runs", str(run_root)]) == 3
    err = err_of(capsys)
    assert err.startswith("quantgate: error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_eval_hands_the_serving_and_stopping_options_to_the_stage(run_root: Path, monkeypatch):
    import evals.stage

    seen = {}
    monkeypatch.setattr(evals.stage, "run_eval_stage", lambda ctx, req: seen.update(ctx=ctx, req=req) or 0)
    policy = run_root / "policy.yaml"
    policy.write_text("schema_version: 2\nquality:\n  alpha: 0.1\n")
    assert main(["eval", "--runs", str(run_root), "--tensor-parallel", "fp8=2", "--max-model-len", "512",
                 "--startup-timeout", "30", "--fixed-n", "--policy", str(policy), "--divergence-tokens", "64",
                 "--divergence-docs", "0", "--limit", "5", "--recipes", "fp8"]) == 0
    ctx, req = seen["ctx"], seen["req"]
    assert ctx.run_dir == run_root / DEFAULT_SLUG
    assert (ctx.tensor_parallel, ctx.max_model_len, ctx.startup_timeout_s) == ({"fp8": 2}, 512, 30.0)
    assert (req.recipes, req.limit, req.divergence_docs, req.divergence_tokens) == (["fp8"], 5, 0, 64)
    assert req.stopping.fixed_n and not req.stopping.on and req.stopping.quality.alpha == 0.1
    assert req.stopping.k == 1  # run.json declares one variant besides the reference
    record = RunRecord.read(ctx.run_dir / "run.json")  # recorded before the stage: the plan it serves by
    assert record.serving["fp8"]["tensor_parallel"] == 2 and record.serving["fp8"]["max_model_len"] == 512
    assert record.serving["bf16"]["tensor_parallel"] == 1
    seen.clear()
    assert main(["eval", "--runs", str(run_root)]) == 0
    assert seen["req"].stopping.on and seen["req"].stopping.quality.alpha == 0.05  # the shipped policy
    assert seen["req"].divergence_tokens is None and seen["ctx"].tensor_parallel == {}


def test_bench_hands_its_options_to_the_stage_and_keeps_its_exit_code(run_root: Path, monkeypatch):
    import evals.bench_stage

    seen = {}
    monkeypatch.setattr(evals.bench_stage, "run_bench_stage", lambda ctx, req: seen.update(ctx=ctx, req=req) or 9)
    cfg = run_root / "b.yaml"
    cfg.write_text("max_load: 64\n")
    assert main(["bench", "--runs", str(run_root), "--config", str(cfg), "--max-load", "16", "--force",
                 "--tensor-parallel", "2"]) == 9
    req = seen["req"]
    assert (req.config_path, req.max_load, req.force) == (cfg, 16, True) and seen["ctx"].tensor_parallel == {"*": 2}


def _all(monkeypatch, code: int) -> dict:
    import quantgate.pipeline

    seen: dict = {}

    def fake(ctx, req, *, stopping):  # noqa: ANN001, ANN202
        seen.update(ctx=ctx, req=req, stopping=stopping)
        return code

    monkeypatch.setattr(quantgate.pipeline, "run_all", fake)
    return seen


def test_all_hands_every_option_to_the_pipeline(run_root: Path, monkeypatch):
    seen = _all(monkeypatch, 2)
    assert main(["all", "--runs", str(run_root), "--recipes", "bf16,fp8", "--require", "fp8", "--deploy-all",
                 "--target-gpu", "L4", "--tensor-parallel", "bf16=2", "--max-model-len", "1024", "--fixed-n",
                 "--divergence-tokens", "32", "--max-load", "16", "--limit", "7"]) == 2  # the gate's no, kept
    ctx, req = seen["ctx"], seen["req"]
    assert (req.recipes, req.require, req.deploy_all, req.target_gpu, req.demo) == \
        (["bf16", "fp8"], "fp8", True, "L4", False)
    assert ctx.target.gpu == "L4" and ctx.tensor_parallel == {"bf16": 2} and ctx.max_model_len == 1024
    assert (req.eval.divergence_tokens, req.eval.limit, req.eval.demo) == (32, 7, None)
    assert (req.bench.max_load, req.bench.recipes) == (16, ["bf16", "fp8"])
    assert req.eval.stopping is None  # built by the pipeline once quantize has declared the recipes
    rule = seen["stopping"]()
    assert rule.fixed_n and rule.k == 1


def test_all_demo_reads_the_gate_but_not_a_broken_tool(run_root: Path, monkeypatch):
    from quantgate.demo import DEMO_LIMIT

    seen = _all(monkeypatch, 2)
    assert main(["all", "--demo", "--runs", str(run_root)]) == 0  # `make demo`: a rejection is a result there
    req = seen["req"]
    assert req.demo and req.eval.limit == DEMO_LIMIT and req.eval.demo["limit"] == DEMO_LIMIT
    assert req.eval.tasks == req.eval.demo["tasks"] and req.eval.divergence_docs == req.eval.demo["divergence_docs"]
    _all(monkeypatch, 1)
    assert main(["all", "--demo", "--runs", str(run_root)]) == 1  # a broken tool is not
    _all(monkeypatch, 9)
    assert main(["all", "--demo", "--runs", str(run_root)]) == 9


def test_a_tool_bug_is_one_line_and_exit_1_and_its_traceback_is_behind_v(run_root: Path, monkeypatch, capsys):
    import reports.stage

    def boom(run_dir):  # noqa: ANN001, ANN202
        raise RuntimeError("parser met something new")

    monkeypatch.setattr(reports.stage, "run_report", boom)
    assert main(["report", str(run_root / DEFAULT_SLUG)]) == 1
    err = err_of(capsys)
    assert err == "quantgate: internal error: RuntimeError: parser met something new (rerun with -v for the traceback)"
    with pytest.raises(RuntimeError, match="parser met something new"):
        main(["-v", "report", str(run_root / DEFAULT_SLUG)])

    def interrupted(run_dir):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(reports.stage, "run_report", interrupted)
    assert main(["report", str(run_root / DEFAULT_SLUG)]) == 130
    assert "finished variants are kept" in err_of(capsys)


# ---- quantize: what a failure leaves, and the demo's sizing ------------------------------------------------------

def test_out_of_disk_exit_code(capsys, tmp_path, monkeypatch, tiny_model):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("quantize.run.shutil.disk_usage", lambda p: usage._replace(free=0))
    runs = tmp_path / "runs"
    assert main(["quantize", "--model", str(tiny_model), "--recipes", "bf16", "--runs", str(runs)]) == 8
    errors = [line for line in err_of(capsys).splitlines() if line.startswith("quantgate: error")]  # not tqdm's
    assert len(errors) == 1 and errors[0].startswith("quantgate: error: out of disk: ") and "free space" in errors[0]
    run_dir = runs / "tiny-llama"
    assert not (run_dir / "bf16").exists() and not list(run_dir.glob(".bf16.tmp-*"))  # no half-built variant
    assert not (run_dir / "run.json").exists()
    assert (tiny_model / "config.json").is_file()


def _fake_quantize(monkeypatch, fail: str | None = None) -> list:
    """quantize.run.quantize that builds bf16 for real (a copy) and writes a manifest for the others, as the
    real one does, with the TARGET_GPU note the real one would record; `fail` raises like llmcompressor."""
    import quantize.run as run
    from quantize.hardware import check_target

    built: list = []
    real = run.quantize

    def quantize(recipe, **kw):  # noqa: ANN001, ANN202
        if recipe.name == fail:  # what llmcompressor/torch raising mid-recipe looks like
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        built.append((recipe, kw["sizing"]))
        if recipe.name == "bf16":
            return real(recipe, **kw)
        note = check_target(recipe, kw["layout"].shapes, kw["layout"].config, kw["target"])
        device = {"device": "cpu", **({"fallback": note} if note else {})}
        return write_manifest(kw["run_dir"], recipe.name, device=device), False

    monkeypatch.setattr(run, "quantize", quantize)
    return built


def test_a_failing_recipe_is_recorded_and_the_others_still_build(tmp_path, monkeypatch, capsys, tiny_model):
    """llmcompressor breaking on one recipe: that recipe FAILED, the rest built, exit 9; target notes printed;
    the failed recipe still counts in the declared family the gate corrects over."""
    built = _fake_quantize(monkeypatch, fail="gptq-4")
    runs = tmp_path / "r"
    code = main(["quantize", "--model", str(tiny_model), "--recipes", "bf16,gptq-4,nvfp4", "--runs", str(runs),
                 "--target-gpu", "9.0"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 9 and [r.name for r, _ in built] == ["bf16", "nvfp4"]
    assert "gptq-4: FAILED in llmcompressor: RuntimeError: CUDA error" in out
    assert "nvfp4: note: served as W4A16 (weight-only FP4, Marlin): CUDA GPU, cc 9 has no FP4" in out  # a fallback
    assert "failed recipes: gptq-4" in out
    record = RunRecord.read(runs / "tiny-llama" / "run.json")
    assert record.declared == ["bf16", "gptq-4", "nvfp4"] and record.reference == "bf16"
    assert (runs / "tiny-llama" / "bf16" / "checkpoint" / "config.json").is_file()  # the real copy


def test_quantize_demo_shrinks_the_calibration_and_records_it(tmp_path, monkeypatch, tiny_model):
    from quantgate.demo import DEMO_SIZING

    built = _fake_quantize(monkeypatch)
    args = ["quantize", "--model", str(tiny_model), "--recipes", "bf16,fp8-kv", "--runs", str(tmp_path)]
    assert main([*args, "--demo"]) == 0
    (bf16, s0), (kv, s1) = built
    assert s0 == s1 == DEMO_SIZING and bf16.calibration is None
    assert (kv.calibration.num_samples, kv.calibration.seq_len) == (DEMO_SIZING["num_samples"], DEMO_SIZING["seq_len"])
    built.clear()
    assert main([*args, "--force"]) == 0
    (_, s0), (kv, s1) = built
    assert s0 is None and s1 is None and (kv.calibration.num_samples, kv.calibration.seq_len) == (64, 512)
