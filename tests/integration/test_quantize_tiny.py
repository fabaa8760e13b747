"""Every shipped recipe on a tiny Llama, on CPU, through llmcompressor's oneshot (the real path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qgcore.errors import GroupSizeError, NoSpaceError, QuantgateError
from quantize.model import Layout, layout, resolve_model
from quantize.recipe import load_recipe
from quantize.run import quantize
from quantize.schemes import SCHEMES, check_quantization_config
from tests.helpers.kl import mean_kl

# Upper bounds on mean per-token KL(bf16 || variant) in nats on held-out text, tiny random model
# (init std 0.1, so its distributions are peaked and quantization error shows). Measured here:
# fp8 0.014, fp8-kv 0.017, gptq-4 0.068, awq-4 0.106, nvfp4 0.172. Each bound is ~3x its measurement
# (8-bit formats an order of magnitude below 4-bit ones, as in the literature), loose enough for
# calibration noise, and far below what a broken checkpoint gives (the damaged-weights check: KL > 1).
KL_BOUND = {"fp8": 0.05, "fp8-kv": 0.05, "gptq-4": 0.25, "awq-4": 0.3, "nvfp4": 0.6}


def tiny_recipe(name: str):
    r = load_recipe(name)
    if r.calibration is None:
        return r
    return r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_samples": 16, "seq_len": 128})})


@pytest.fixture(scope="module")
def built(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    model = resolve_model(str(tiny_model))
    run_dir = tmp_path_factory.mktemp("runs") / model.slug
    lay = layout(model.path)
    out = {}
    for name in ["bf16", *KL_BOUND]:
        out[name] = quantize(tiny_recipe(name), model=model, run_dir=run_dir, layout=lay)[0]
    return model, run_dir, out


@pytest.mark.parametrize("name", list(KL_BOUND))
def test_recipe_checkpoint_is_what_recipe_promises(built, name):
    _, run_dir, manifests = built
    m = manifests[name]
    ckpt = run_dir / name / m.checkpoint_dir
    config = json.loads((ckpt / "config.json").read_text())
    assert check_quantization_config(load_recipe(name), config) == []
    q = config["quantization_config"]
    assert "lm_head" in q["ignore"]
    if name == "fp8-kv":
        assert q["kv_cache_scheme"]["num_bits"] == 8 and q["kv_cache_scheme"]["type"] == "float"
    assert m.quantization["quantized"] is True
    assert m.bytes_on_disk > 0 and m.wall_seconds > 0 and m.peak_memory["rss_bytes"] > 0
    assert m.versions["llmcompressor"] == "0.14.0.1"
    assert (m.calibration_data or "").startswith("python-stdlib-docstrings/calibration@") == (name != "fp8")


@pytest.mark.parametrize("name", list(KL_BOUND))
def test_checkpoint_reloads_and_diverges_little(built, name):
    _, run_dir, manifests = built
    kl = mean_kl(run_dir / "bf16" / "checkpoint", run_dir / name / "checkpoint")
    print(f"KL[{name}] = {kl:.5f}")
    assert 0 < kl < KL_BOUND[name]


def test_kl_check_catches_a_damaged_checkpoint(built, tmp_path):
    """The divergence bound is not vacuous: perturbed weights blow straight through it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    _, run_dir, _ = built
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir / "bf16" / "checkpoint", damaged)
    weights = load_file(damaged / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k, w in weights.items():
        if k.endswith("proj.weight"):
            weights[k] = (w.float() + torch.randn(w.shape, generator=gen) * w.float().std()).to(w.dtype)
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    assert mean_kl(run_dir / "bf16" / "checkpoint", damaged) > max(KL_BOUND.values())


def test_bf16_is_saved_as_is(built):
    model, run_dir, manifests = built
    assert manifests["bf16"].quantization["quantized"] is False
    src = Path(model.path) / "model.safetensors"
    assert (run_dir / "bf16" / "checkpoint" / "model.safetensors").read_bytes() == src.read_bytes()


def test_rerun_skips_same_content_key(built):
    model, run_dir, manifests = built
    again, reused = quantize(tiny_recipe("fp8"), model=model, run_dir=run_dir)
    assert reused and again.content_key == manifests["fp8"].content_key


def test_changed_recipe_changes_key_and_rebuilds(built):
    model, run_dir, manifests = built
    r = tiny_recipe("gptq-4")
    r2 = r.model_copy(update={"calibration": r.calibration.model_copy(update={"seed": 1})})
    m2, reused = quantize(r2, model=model, run_dir=run_dir)
    assert not reused and m2.content_key != manifests["gptq-4"].content_key


def test_killed_run_leaves_nothing_that_looks_complete(built, monkeypatch):
    model, run_dir, _ = built
    import quantize.run as qrun

    def boom(recipe, model, out):  # simulate Ctrl-C halfway through writing the checkpoint
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(qrun, "_oneshot", boom)
    r = tiny_recipe("nvfp4").model_copy(update={"name": "nvfp4-killed"})
    with pytest.raises(KeyboardInterrupt):
        quantize(r, model=model, run_dir=run_dir)
    assert not (run_dir / "nvfp4-killed").exists()
    assert not list(run_dir.glob(".nvfp4-killed.tmp-*"))
    assert (run_dir / "nvfp4" / "manifest.json").is_file()  # finished work untouched


def test_stale_tmp_from_a_killed_process_is_cleaned(built):
    model, run_dir, _ = built
    stale = run_dir / ".fp8.tmp-999999"
    (stale / "checkpoint").mkdir(parents=True)
    quantize(tiny_recipe("fp8"), model=model, run_dir=run_dir)
    assert not stale.exists()


def test_recipe_that_quantizes_nothing_fails_loudly(built, monkeypatch):
    model, run_dir, _ = built
    import dataclasses

    from quantize import schemes

    monkeypatch.setitem(schemes.SCHEMES, "fp8_dynamic", dataclasses.replace(SCHEMES["fp8_dynamic"],
                                                                               build=lambda r: []))
    r = tiny_recipe("fp8").model_copy(update={"name": "fp8-empty"})
    with pytest.raises(QuantgateError, match="quantized nothing"):
        quantize(r, model=model, run_dir=run_dir, force=True)
    assert not (run_dir / "fp8-empty").exists()


def test_group_size_mismatch_fails_before_calibration(tiny_model, tmp_path):
    widths = {"model.layers.0.mlp.down_proj": 576, "model.layers.0.self_attn.q_proj": 576, "lm_head": 576}
    r = load_recipe("gptq-4").model_copy(update={"quant": load_recipe("gptq-4").quant.model_copy(
        update={"group_size": 128})})
    real = layout(str(tiny_model))
    lay = Layout(widths=widths, shapes=real.shapes, config=real.config)
    with pytest.raises(GroupSizeError, match=r"group_size 128 does not divide layer 'model\.layers\.0\..*' input "
                                             r"width 576.*fit every layer: 16, 32, 64"):
        quantize(r, model=resolve_model(str(tiny_model)), run_dir=tmp_path, layout=lay)
    assert not any(tmp_path.iterdir())


def test_out_of_disk_is_reported_and_nothing_written(tiny_model, tmp_path, monkeypatch):
    import shutil as sh

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr("quantize.run.shutil.disk_usage", lambda p: usage._replace(free=1024))
    with pytest.raises(NoSpaceError, match="out of disk"):
        quantize(load_recipe("fp8"), model=resolve_model(str(tiny_model)), run_dir=tmp_path / "r")
    assert not list((tmp_path / "r").glob("fp8*"))


def test_pin_memory_guard_only_without_accelerator():
    import torch

    from quantize.run import _guard_pin_memory

    _guard_pin_memory()
    from llmcompressor.pipelines.cache import IntermediatesCache

    assert getattr(IntermediatesCache, "_quantgate_guard", False) == (not torch.accelerator.is_available())
