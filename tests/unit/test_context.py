"""The run context: resolved once (precedence of flags, environment and detection), and run.json kept current
(the declared recipe set only grows, across invocations and deletions).

"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from qgcore.artifacts import RunRecord
from qgcore.device import Platform
from qgcore.errors import EXIT_CONFIG, ArtifactError, ConfigError
from qgcore.paths import DEFAULT_SLUG
from quantgate import context
from quantgate.context import declared_k, parse_tensor_parallel, record_run, resolve, serve_python
from tests.helpers.artifacts import H100, write_manifest

GiB = 2**30


def ctx_for(runs: Path, **kw: Any):  # noqa: ANN201 - a RunContext
    """A context whose run folder is `runs/<slug of the tiny model>`, on a given platform (no detection)."""
    kw.setdefault("platform", Platform("cpu", cpu="test cpu", source="test"))
    return resolve(runs_root=runs, model="org/tiny", **kw)


# ---- resolve(): what wins over what ---------------------------------------------------------------------------

def test_run_folder_is_the_models_slug_under_the_runs_root(tmp_path: Path):
    cpu = Platform("cpu", source="test")
    assert resolve(runs_root=tmp_path, model=None, platform=cpu).run_dir == tmp_path / DEFAULT_SLUG
    assert resolve(runs_root=tmp_path, model="Org/Some-Model", platform=cpu).run_dir == tmp_path / "org--some-model"
    local = tmp_path / "My Model"
    local.mkdir()
    assert resolve(runs_root=tmp_path / "r", model=str(local), platform=cpu).run_dir == tmp_path / "r" / "my-model"


def test_a_given_platform_wins_over_detection_and_the_environment(monkeypatch):
    monkeypatch.setenv("QUANTGATE_DEVICE", "bogus")  # never read when the platform is given (a Ray cluster's)
    ctx = resolve(runs_root=Path("runs"), model=None, platform=H100)
    assert ctx.platform == H100
    with pytest.raises(ConfigError, match="QUANTGATE_DEVICE=bogus: use cpu or cuda"):
        resolve(runs_root=Path("runs"), model=None)
    monkeypatch.setenv("QUANTGATE_DEVICE", "cpu")
    forced = resolve(runs_root=Path("runs"), model=None)
    assert forced.platform.kind == "cpu" and forced.platform.source == "QUANTGATE_DEVICE=cpu"


def test_target_gpu_wins_over_the_platform_measured_on():
    cpu = Platform("cpu", cpu="test cpu", source="test")
    assert resolve(runs_root=Path("runs"), model=None, platform=cpu, target_gpu="L4").target.gpu == "L4"
    assert resolve(runs_root=Path("runs"), model=None, platform=cpu, target_gpu="L4").target.source == "TARGET_GPU"
    own = resolve(runs_root=Path("runs"), model=None, platform=H100).target
    assert (own.kind, own.gpu, own.compute_capability, own.gpu_count, own.gpu_memory_bytes) == \
        ("cuda", "H100", 9.0, 8, 80 * GiB)
    assert own.source == "the platform measured"
    with pytest.raises(ConfigError, match="Did you mean: H100"):
        resolve(runs_root=Path("runs"), model=None, platform=cpu, target_gpu="H10")


def test_serve_python_precedence(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("QUANTGATE_SERVE_PYTHON", "/opt/serve/bin/python")
    assert serve_python() == "/opt/serve/bin/python"
    assert ctx_for(tmp_path).serve_python == "/opt/serve/bin/python"
    monkeypatch.delenv("QUANTGATE_SERVE_PYTHON")
    monkeypatch.setattr(context, "PROJECT_ROOT", tmp_path)  # no serving venv built: this interpreter
    assert serve_python() == sys.executable
    venv = tmp_path / ".venvs" / "serve" / "bin" / "python"
    venv.parent.mkdir(parents=True)
    venv.write_text("")
    assert serve_python() == str(venv)  # `make setup` built it


def test_number_moving_environment_is_pinned_when_the_context_is_resolved(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/somewhere")  # changes no number: not pinned
    ctx = ctx_for(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # a library setting it later changes nothing recorded
    assert ctx.pinned_env.get("OMP_NUM_THREADS") == "3" and "VLLM_CACHE_ROOT" not in ctx.pinned_env


@pytest.mark.parametrize(("kw", "needle"), [
    ({"max_model_len": 15}, "--max-model-len 15: give a context of at least 16 tokens"),
    ({"startup_timeout": 0}, "--startup-timeout 0: give seconds > 0"),
    ({"startup_timeout": -5.0}, "--startup-timeout -5.0: give seconds > 0"),
    ({"tensor_parallel": "3"}, "--tensor-parallel '3'"),
])
def test_bad_serving_overrides_are_config_errors(tmp_path: Path, kw, needle):
    with pytest.raises(ConfigError) as err:
        ctx_for(tmp_path, **kw)
    assert needle in str(err.value) and err.value.exit_code == EXIT_CONFIG


def test_serving_plan_overrides_beat_the_weights_and_never_exceed_the_models_context(tmp_path: Path):
    run = tmp_path / "org--tiny"
    big = write_manifest(run, "bf16", bytes_on_disk=140 * 10**9)  # 70B in bf16: more than one 80 GiB GPU
    small = write_manifest(run, "fp8", bytes_on_disk=1 << 20)
    auto = ctx_for(tmp_path, platform=H100)
    # 140 GB x 1.3 over 0.85 x 80 GiB: 2.5 -> 4 (a power of two)
    assert auto.serving(big).tensor_parallel == 4 and auto.serving(big).gpus == 4
    assert auto.serving(small).tensor_parallel == 1
    assert auto.serving(big).max_model_len == 2048  # the model's own max_position_embeddings
    ctx = ctx_for(tmp_path, platform=H100, tensor_parallel="fp8=2,*=8", max_model_len=512)
    assert ctx.serving(small).tensor_parallel == 2  # the variant's own override beats `*`
    assert ctx.serving(big).tensor_parallel == 8 and ctx.serving(big).sources["tensor_parallel"] == "--tensor-parallel"
    assert ctx.serving(big).max_model_len == 512
    assert ctx_for(tmp_path, platform=H100, max_model_len=100_000).serving(big).max_model_len == 2048
    cpu = ctx_for(tmp_path)
    assert (cpu.serving(big).tensor_parallel, cpu.serving(big).gpus) == (1, 0)  # CPU: one rank, no GPUs


# ---- --tensor-parallel ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "want"), [
    (None, {}), ("", {}), ("2", {"*": 2}), ("bf16=4,fp8=2", {"bf16": 4, "fp8": 2}),
    ("bf16=4, *=2", {"bf16": 4, "*": 2}), ("1", {"*": 1}),
])
def test_parse_tensor_parallel(value, want):
    assert parse_tensor_parallel(value) == want


@pytest.mark.parametrize(("value", "fix"), [
    ("two", "give N or name=N,... with integers"),
    ("bf16=x", "give N or name=N,... with integers"),
    ("bf16=4,", "give N or name=N,... with integers"),
    ("3", "sizes must be powers of two (1, 2, 4, 8)"),
    ("bf16=6", "sizes must be powers of two (1, 2, 4, 8)"),
    ("0", "sizes must be powers of two (1, 2, 4, 8)"),
    ("-2", "sizes must be powers of two (1, 2, 4, 8)"),
])
def test_parse_tensor_parallel_errors_are_one_line_naming_the_fix(value, fix):
    with pytest.raises(ConfigError) as err:
        parse_tensor_parallel(value)
    text = str(err.value)
    assert text.startswith(f"--tensor-parallel '{value}': ") and text.endswith(fix) and "\n" not in text
    assert err.value.exit_code == EXIT_CONFIG


# ---- run.json ------------------------------------------------------------------------------------------------------

FAMILIES = {"bf16": "reference", "fp8": "8bit", "gptq-4": "4bit", "awq-4": "4bit"}


def test_record_run_declared_set_is_the_union_over_invocations_and_never_shrinks(tmp_path: Path):
    ctx = ctx_for(tmp_path)
    run = ctx.run_dir
    write_manifest(run, "bf16")
    write_manifest(run, "fp8")
    # first `quantgate quantize --recipes fp8,bf16,gptq-4`: gptq-4 failed (no manifest) but was declared
    first = record_run(ctx, declared=["fp8", "bf16", "gptq-4"], families=FAMILIES)
    assert first.declared == ["bf16", "fp8", "gptq-4"] and first.reference == "bf16"  # the reference first
    assert set(first.serving) == {"bf16", "fp8"}  # a serving plan only for what was built
    assert declared_k(ctx) == 2
    # a second invocation adds awq-4
    write_manifest(run, "awq-4")
    record_run(ctx, declared=["bf16", "awq-4"], families={"bf16": "reference", "awq-4": "4bit"})
    on_disk = RunRecord.read(run / "run.json")
    assert on_disk.declared == ["bf16", "fp8", "gptq-4", "awq-4"]
    assert on_disk.families == FAMILIES
    assert declared_k(ctx) == 3
    # deleting a variant's folder never shrinks the gate's family
    for f in sorted((run / "fp8").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (run / "fp8").rmdir()
    again = record_run(ctx)  # what `eval` / `bench` call
    assert again.declared == ["bf16", "fp8", "gptq-4", "awq-4"] and "fp8" in again.serving
    assert declared_k(ctx) == 3
    assert again.target == ctx.target.to_dict()


def test_record_run_keeps_each_variants_serving_plan_current(tmp_path: Path):
    run = tmp_path / "org--tiny"
    write_manifest(run, "bf16")
    write_manifest(run, "fp8")
    record_run(ctx_for(tmp_path), declared=["bf16", "fp8"], families=FAMILIES)
    assert RunRecord.read(run / "run.json").serving["fp8"]["tensor_parallel"] == 1
    rec = record_run(ctx_for(tmp_path, platform=H100, tensor_parallel="fp8=2", max_model_len=1024))
    fp8 = rec.serving["fp8"]
    assert (fp8["tensor_parallel"], fp8["gpus"], fp8["max_model_len"]) == (2, 2, 1024)
    assert rec.serving["bf16"]["tensor_parallel"] == 1 and rec.serving["bf16"]["max_model_len"] == 1024


def test_record_run_refuses_a_run_without_exactly_one_reference_manifest(tmp_path: Path):
    ctx = ctx_for(tmp_path)
    write_manifest(ctx.run_dir, "fp8")
    with pytest.raises(ArtifactError, match="the reference bf16 has no manifest yet: run `make quantize` first"):
        record_run(ctx, declared=["bf16", "fp8"], families=FAMILIES)
    write_manifest(ctx.run_dir, "bf16")
    with pytest.raises(ArtifactError, match=r"2 recipes \(bf16, other\) with family: reference"):
        record_run(ctx, declared=["other"], families={"other": "reference"})
    assert not (ctx.run_dir / "run.json").exists()  # nothing half written


def test_declared_k_without_run_json_counts_the_variants_present(tmp_path: Path):
    ctx = ctx_for(tmp_path)
    write_manifest(ctx.run_dir, "bf16")
    assert declared_k(ctx) == 1  # never 0: the stopping level divides by it
    write_manifest(ctx.run_dir, "fp8")
    write_manifest(ctx.run_dir, "awq-4")
    assert declared_k(ctx) == 2
