"""Recipes: strict YAML, a scheme from the registry, the reference iff scheme `none`, serving flags that are the
recipe's own (not the run's), and a gate section shared with the gate (qgcore.quality.RecipeGate)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qgcore.errors import EXIT_CONFIG, ConfigError, GroupSizeError
from qgcore.quality import RecipeGate
from qgcore.vocab import REFERENCE, reference_of
from quantize.recipe import RECIPES_DIR, Sizing, available_recipes, load_recipe, load_recipes, parse_recipe
from quantize.schemes import SCHEMES

FILES = sorted(RECIPES_DIR.glob("*.yaml"))
BITS = {"8bit": 8, "4bit": 4}


def test_the_recipes_folder_is_what_is_available():
    assert FILES, f"no recipes in {RECIPES_DIR}"
    assert available_recipes() == sorted(p.stem for p in FILES if not p.stem.startswith("_"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_shipped_recipe_loads_with_a_registered_scheme_that_matches_its_family(path: Path):
    r = load_recipe(path)
    assert r.name == path.stem and r == load_recipe(path.stem)
    assert r.quant.scheme in SCHEMES
    assert "hardware" not in yaml.safe_load(path.read_text())  # the target GPU is the run's (TARGET_GPU)
    planned = SCHEMES[r.quant.scheme].summary(r)  # what config.json will say: the kernel preflight's input
    if r.family == REFERENCE:
        assert r.quant.scheme == "none" and not planned["quantized"]
    else:
        assert planned["quantized"] and planned["weights"]["num_bits"] == BITS[r.family]
        assert "lm_head" in r.quant.ignore  # small and sensitive: kept in BF16
    assert (r.calibration is not None) == SCHEMES[r.quant.scheme].needs_calibration
    assert isinstance(r.gate, RecipeGate)


def test_exactly_one_shipped_recipe_is_the_reference_and_it_loads_first():
    recipes = load_recipes(None)
    ref = reference_of({r.name: r.family for r in recipes})
    assert recipes[0].name == ref and recipes[0].quant.scheme == "none"
    assert [r.name for r in load_recipes([*available_recipes()[::-1]])][0] == ref  # whatever order is asked


def test_shipped_declarations():
    assert load_recipe("fp8-kv").serve.kv_cache_dtype == "fp8"
    assert load_recipe("fp8").serve.kv_cache_dtype == "auto"
    assert load_recipe("nvfp4").effective_group_size == SCHEMES["nvfp4"].fixed_group_size == 16
    from quantize.run import check_group_size

    gptq = load_recipe("gptq-4")
    smollm2 = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    check_group_size(gptq, smollm2)  # the shipped group size fits SmolLM2's widths
    wide = gptq.model_copy(update={"quant": gptq.quant.model_copy(update={"group_size": 128})})
    with pytest.raises(GroupSizeError, match="576"):
        check_group_size(wide, smollm2)


def test_unknown_recipe_name_suggests():
    with pytest.raises(ConfigError, match=r"Unknown recipe 'fp4'\. Did you mean: .*nvfp4") as err:
        load_recipe("fp4")
    assert err.value.exit_code == EXIT_CONFIG


def _base() -> dict:
    return {"name": "x", "description": "d", "family": "4bit",
            "quant": {"scheme": "gptq_w4a16", "group_size": 64}, "calibration": {"num_samples": 8}}


def _parse(**changes) -> object:
    data = _base()
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_recipe(data, source="x.yaml")


def test_the_base_recipe_is_valid():
    r = _parse()
    assert (r.quant.scheme, r.family, r.serve.extra_args, r.gate) == ("gptq_w4a16", "4bit", [], RecipeGate())


@pytest.mark.parametrize(("scheme", "suggestion"), [("gptq", "gptq_w4a16"), ("nvfp5", "nvfp4"),
                                                    ("fp8_dynamik", "fp8_dynamic")])
def test_unknown_scheme_suggests_a_registered_one(scheme: str, suggestion: str):
    with pytest.raises(ConfigError, match=rf"x\.yaml: quant\.scheme: Unknown scheme '{scheme}'\. Did you mean: "
                                          rf"[^?]*\b{suggestion}\b") as err:
        _parse(quant={"scheme": scheme})
    assert err.value.exit_code == EXIT_CONFIG and "Available: " + ", ".join(sorted(SCHEMES)) in str(err.value)


@pytest.mark.parametrize("args", [["--tensor-parallel-size", "2"], ["--tensor-parallel-size=2"], ["-tp", "2"],
                                  ["-tp=2"], ["--max-model-len", "4096"], ["--max-model-len=4096"],
                                  ["--enable-prefix-caching", "--kv-cache-dtype", "fp8"]])
def test_serve_extra_args_may_not_set_what_the_run_sets(args: list[str]):
    with pytest.raises(ConfigError, match=r"serve\.extra_args may not set (--tensor-parallel-size|-tp|--max-model-len"
                                          r"|--kv-cache-dtype)") as err:
        _parse(serve={"extra_args": args})
    assert "--tensor-parallel" in str(err.value) and "serve.kv_cache_dtype" in str(err.value)  # says where instead


@pytest.mark.parametrize("args", [["--max_model_len", "4096"], ["--tensor-parallel", "2"], ["--kv_cache_dtype=fp8"]])
def test_serve_extra_args_refuse_the_spellings_vllm_also_accepts(args: list[str]):
    with pytest.raises(ConfigError, match="may not set"):
        _parse(serve={"extra_args": args})


def test_other_serve_flags_pass_through():
    r = _parse(serve={"extra_args": ["--enable-prefix-caching", "--gpu-memory-utilization=0.8"]})
    assert r.serve.extra_args == ["--enable-prefix-caching", "--gpu-memory-utilization=0.8"]


def test_a_hardware_section_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"^x\.yaml: hardware: unknown key \(the schema is strict\)$"):
        _parse(hardware={"min_compute_capability": 8.9})


@pytest.mark.parametrize(("changes", "message"), [
    ({"quant": {"group_sise": 64}}, r"quant\.group_sise: unknown key"),
    ({"calibration": None}, r"scheme 'gptq_w4a16' calibrates: add a calibration: section"),
    ({"quant": {"scheme": "nvfp4", "group_size": 32}}, r"fixed group size of 16"),
    ({"quant": {"scheme": "awq_w4a16", "group_size": None}}, r"needs quant\.group_size"),
    ({"quant": {"grid_points": 10}}, r"grid_points sizes AWQ's scale search; scheme 'gptq_w4a16' has none"),
    ({"family": "3bit"}, r"family: Unknown value '3bit'\. Did you mean: "),
    ({"serve": {"kv_cache_dtype": "fp4"}}, r"serve\.kv_cache_dtype: Unknown value 'fp4'\. Did you mean: fp8\?"),
    ({"calibration": {"source": "hub"}}, r"calibration\.source 'hub' needs calibration\.dataset"),
])
def test_invalid_recipes_fail_with_one_line(changes: dict, message: str):
    with pytest.raises(ConfigError, match=message) as err:
        _parse(**changes)
    assert str(err.value).startswith("x.yaml: ") and "\n" not in str(err.value)


@pytest.mark.parametrize(("family", "scheme"), [("reference", "fp8_dynamic"), ("8bit", "none"), ("4bit", "none")])
def test_the_reference_is_scheme_none_and_only_it(family: str, scheme: str):
    with pytest.raises(ConfigError, match="the reference is the recipe with scheme 'none' and family: reference"):
        _parse(family=family, quant={"scheme": scheme, "group_size": None}, calibration=None)


def test_a_reference_recipe_of_any_name_is_valid():
    r = _parse(name="base", family="reference", quant={"scheme": "none", "group_size": None}, calibration=None)
    assert r.family == REFERENCE and r.effective_group_size is None


def test_the_gate_section_is_the_gates_own_type_and_is_validated():
    r = _parse(gate={"quality_margin": 0.03, "recovery_min": 0.9})
    assert r.gate == RecipeGate(quality_margin=0.03, recovery_min=0.9)
    assert r.model_dump(mode="json")["gate"] == {"quality_margin": 0.03, "recovery_min": 0.9}  # as the manifest has it
    assert RecipeGate(**r.model_dump(mode="json")["gate"]) == r.gate  # and as the gate reads it back
    with pytest.raises(ConfigError, match=r"gate: gate\.quality_margin must be >= 0"):
        _parse(gate={"quality_margin": -0.01})
    with pytest.raises(ConfigError, match=r"gate: gate\.recovery_min must be in \(0, 1\]"):
        _parse(gate={"recovery_min": 1.5})
    with pytest.raises(ConfigError, match=r"gate\.quality_margn: unknown key"):
        _parse(gate={"quality_margn": 0.03})


def test_name_must_match_file(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text((RECIPES_DIR / "fp8.yaml").read_text())
    with pytest.raises(ConfigError, match="name 'fp8' must match the file name 'mine'"):
        load_recipe(p)


def test_bad_files_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")
    p = tmp_path / "x.yaml"
    p.write_text("name: [x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("- x\n")
    with pytest.raises(ConfigError, match="a recipe must be a YAML mapping"):
        load_recipe(p)


def test_content_hash_ignores_comments_and_order(tmp_path: Path):
    text = (RECIPES_DIR / "fp8.yaml").read_text()
    a = tmp_path / "fp8.yaml"
    a.write_text("# a comment\n" + yaml.safe_dump(dict(reversed(list(yaml.safe_load(text).items())))))
    assert load_recipe(a).content_hash() == load_recipe("fp8").content_hash()
    hashes = {load_recipe(n).content_hash() for n in available_recipes()}
    assert len(hashes) == len(available_recipes())  # every recipe is its own checkpoint


def test_grid_points_only_for_awq_and_reaches_the_modifier():
    awq = load_recipe("awq-4")
    data = copy.deepcopy(awq.model_dump(mode="json"))
    data["quant"]["grid_points"] = 10
    tuned = parse_recipe(data, source="awq.yaml")
    assert tuned.content_hash() != awq.content_hash()  # a coarser search is another checkpoint
    pytest.importorskip("llmcompressor")
    assert SCHEMES["awq_w4a16"].build(tuned)[0].n_grid == 10
    assert SCHEMES["awq_w4a16"].build(awq)[0].n_grid == 20  # llmcompressor's default when the recipe says nothing


def test_demo_sizing_replaces_calibration_and_awq_grid_only_where_they_exist():
    sizing = Sizing(num_samples=32, seq_len=256, grid_points=10)
    for name in available_recipes():
        r = load_recipe(name)
        sized = sizing.apply(r)
        if r.calibration is None:
            assert sized == r  # uncalibrated: unchanged
            continue
        assert (sized.calibration.num_samples, sized.calibration.seq_len) == (32, 256)
        assert sized.quant.grid_points == (10 if SCHEMES[r.quant.scheme].grid_search else r.quant.grid_points)
        assert sized.content_hash() != r.content_hash()
