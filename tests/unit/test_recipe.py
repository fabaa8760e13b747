from pathlib import Path

import pytest

from qgcore.errors import EXIT_CONFIG, ConfigError, GroupSizeError
from quantize.recipe import RECIPES_DIR, available_recipes, load_recipe, load_recipes, parse_recipe

SHIPPED = ["awq-4", "bf16", "fp8", "fp8-kv", "gptq-4", "nvfp4"]


def test_shipped_recipes_exactly_the_six_variants():
    assert available_recipes() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name
    assert "lm_head" in r.quant.ignore or r.quant.scheme == "none"


def test_recipe_declarations():
    r = {n: load_recipe(n) for n in SHIPPED}
    assert r["fp8-kv"].serve.kv_cache_dtype == "fp8"
    assert r["fp8"].hardware.min_compute_capability == 8.9
    assert r["nvfp4"].hardware.min_compute_capability == 10.0
    assert r["nvfp4"].hardware.fallback_min_compute_capability is not None
    assert r["nvfp4"].effective_group_size == 16
    from quantize.run import check_group_size

    smollm2 = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    check_group_size(r["gptq-4"], smollm2)  # the shipped group size fits SmolLM2's widths
    with pytest.raises(GroupSizeError, match="576"):
        check_group_size(r["gptq-4"].model_copy(update={"quant": r["gptq-4"].quant.model_copy(
            update={"group_size": 128})}), smollm2)
    for n in ("fp8-kv", "awq-4", "gptq-4", "nvfp4"):
        assert r[n].calibration is not None and r[n].calibration.source == "builtin"


def test_bf16_first_in_load_order():
    assert [r.name for r in load_recipes(["nvfp4", "bf16"])] == ["bf16", "nvfp4"]


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match=r"Unknown recipe 'fp4'\. Did you mean: .*nvfp4") as ei:
        load_recipe("fp4")
    assert ei.value.exit_code == EXIT_CONFIG


def _base():
    return {"name": "x", "description": "d", "family": "4bit",
            "quant": {"scheme": "gptq_w4a16", "group_size": 64}, "calibration": {"num_samples": 8}}


def test_unknown_key_rejected():
    data = _base()
    data["quant"]["group_sise"] = 64
    with pytest.raises(ConfigError, match=r"quant.group_sise: unknown key"):
        parse_recipe(data, source="x.yaml")


def test_mistyped_scheme_rejected():
    data = _base()
    data["quant"]["scheme"] = "gptq"
    with pytest.raises(ConfigError, match=r"quant.scheme"):
        parse_recipe(data, source="x.yaml")


def test_calibrated_scheme_needs_calibration():
    data = _base()
    del data["calibration"]
    with pytest.raises(ConfigError, match="calibrates"):
        parse_recipe(data, source="x.yaml")


def test_nvfp4_group_size_is_fixed():
    data = {"name": "x", "description": "d", "family": "4bit", "quant": {"scheme": "nvfp4", "group_size": 32},
            "calibration": {}}
    with pytest.raises(ConfigError, match="fixed group size of 16"):
        parse_recipe(data, source="x.yaml")


def test_name_must_match_file(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text((RECIPES_DIR / "fp8.yaml").read_text())
    with pytest.raises(ConfigError, match="must match the file name"):
        load_recipe(p)


def test_content_hash_ignores_comments(tmp_path: Path):
    a = tmp_path / "fp8.yaml"
    a.write_text("# a comment\n" + (RECIPES_DIR / "fp8.yaml").read_text())
    assert load_recipe(a).content_hash() == load_recipe("fp8").content_hash()
    assert load_recipe("fp8").content_hash() != load_recipe("fp8-kv").content_hash()


def test_grid_points_only_for_awq_and_reaches_the_modifier():
    awq = load_recipe("awq-4")
    data = awq.model_dump(mode="json")
    data["quant"]["grid_points"] = 10
    tuned = parse_recipe(data, source="awq.yaml")
    assert tuned.content_hash() != awq.content_hash()  # a coarser search is another checkpoint
    gptq = load_recipe("gptq-4").model_dump(mode="json")
    gptq["quant"]["grid_points"] = 10
    with pytest.raises(ConfigError, match="grid_points sizes AWQ's scale search; scheme 'gptq_w4a16' has none"):
        parse_recipe(gptq, source="gptq.yaml")
    pytest.importorskip("llmcompressor")
    from quantize.schemes import SCHEMES

    assert SCHEMES["awq_w4a16"].build(tuned)[0].n_grid == 10
    assert SCHEMES["awq_w4a16"].build(awq)[0].n_grid == 20  # llmcompressor's default when the recipe says nothing


def test_demo_sizing_replaces_calibration_and_awq_grid_only_where_they_exist():
    from quantize.recipe import Sizing

    sizing = Sizing(num_samples=32, seq_len=256, grid_points=10)
    r = {n: sizing.apply(load_recipe(n)) for n in SHIPPED}
    assert r["awq-4"].quant.grid_points == 10 and r["gptq-4"].quant.grid_points is None
    assert r["bf16"] == load_recipe("bf16") and r["fp8"] == load_recipe("fp8")  # uncalibrated: unchanged
    assert {(r[n].calibration.num_samples, r[n].calibration.seq_len) for n in ("fp8-kv", "awq-4", "gptq-4", "nvfp4")} \
        == {(32, 256)}
