"""Every bad input: one clear line, a distinct exit code, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from qgcore.errors import EXIT_CODES
from quantgate.cli import build_parser, main


def err_of(capsys) -> str:
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", ["quantize", "eval", "bench", "report", "gate", "all"])
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


def test_target_gpu_cannot_run_scheme(capsys, tmp_path):
    assert main(["quantize", "--recipes", "nvfp4", "--target-gpu", "T4", "--runs", str(tmp_path)]) == 7
    assert "needs compute capability >= 8.0" in err_of(capsys)
    assert main(["quantize", "--recipes", "fp8", "--target-gpu", "H10", "--runs", str(tmp_path)]) == 3
    assert "Did you mean: H100" in err_of(capsys)


def test_bad_recipe_yaml(capsys, tmp_path):
    p = tmp_path / "fp8x.yaml"
    p.write_text("name: fp8x\ndescription: d\nfamily: 8bit\nquant:\n  scheme: fp8_dynamic\n  ignor: [lm_head]\n")
    assert main(["quantize", "--recipes", str(p), "--runs", str(tmp_path)]) == 3
    assert "quant.ignor: unknown key" in err_of(capsys)


def test_bad_usage_is_config_error(capsys):
    assert main(["quantize", "--no-such-flag"]) == 3


def test_eval_without_quantize_output(capsys, tmp_path):
    assert main(["eval", "--model", str(tmp_path / "x"), "--runs", str(tmp_path)]) == 1
    assert "run `make quantize` first" in err_of(capsys)


def test_bench_bad_config(capsys, tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("slo: {ttft_p95_s: -1}\n")
    assert main(["bench", "--config", str(p), "--runs", str(tmp_path)]) == 3
    assert "slo.ttft_p95_s" in err_of(capsys)


def test_out_of_disk_exit_code(capsys, tmp_path, monkeypatch):
    import shutil

    from quantize import model as qmodel

    tiny = tmp_path / "m"
    tiny.mkdir()
    (tiny / "config.json").write_text("{}")
    monkeypatch.setattr(qmodel, "linear_input_widths", lambda p: {})
    import quantize.check as check

    monkeypatch.setattr(check, "linear_input_widths", lambda p: {})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("quantize.run.shutil.disk_usage", lambda p: usage._replace(free=0))
    assert main(["quantize", "--model", str(tiny), "--recipes", "bf16", "--runs", str(tmp_path / "runs")]) == 8
    assert "out of disk" in err_of(capsys)
    assert not (tmp_path / "runs" / "m" / "bf16").exists()
    assert Path(tmp_path / "m" / "config.json").is_file()


def test_a_failing_recipe_is_recorded_and_the_others_still_build(tmp_path, monkeypatch, capsys):
    """llmcompressor breaking on one recipe: that recipe FAILED, the rest built, exit 9; target notes printed."""
    import quantize.check as check
    import quantize.run as run

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(check, "linear_input_widths", lambda p: {"layer": 128})
    built = []
    real_quantize = run.quantize

    def quantize(recipe, **kwargs):
        if recipe.name == "gptq-4":  # what llmcompressor/torch raising mid-recipe looks like
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        built.append(recipe.name)
        if recipe.name == "bf16":
            return real_quantize(recipe, **kwargs)  # the real copy of the reference
        return _fake_manifest(recipe.name, kwargs["target_cc"]), False

    monkeypatch.setattr(run, "quantize", quantize)
    code = main(["quantize", "--model", str(model), "--recipes", "bf16,gptq-4,nvfp4", "--runs", str(tmp_path / "r"),
                 "--target-gpu", "9.0"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 9 and built == ["bf16", "nvfp4"]
    assert "gptq-4: FAILED in llmcompressor: RuntimeError: CUDA error" in out
    assert "nvfp4: note: weight-only NVFP4" in out  # the TARGET_GPU fallback note is printed
    assert "failed recipes: gptq-4" in out


def _fake_manifest(name: str, target_cc):  # noqa: ANN001, ANN202
    from quantize.hardware import check_target
    from quantize.recipe import load_recipe
    from tests.unit.test_report import _manifest

    note = check_target(load_recipe(name), target_cc)
    m = _manifest(name, 1000)
    return m.model_copy(update={"device": {"device": "cpu", **({"fallback": note} if note else {})}})
