"""The gate policy: one strict section per registered gate check, the shipped YAML the one home of the
defaults, a user's file merged over it key by key; and the quality promise's own arithmetic (qgcore.quality)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from qgcore.errors import EXIT_CONFIG, ConfigError
from qgcore.quality import QualityPolicy, SequentialPolicy, holm_levels
from reports import policy as policy_mod
from reports.gate import CHECKS, CheckSpec
from reports.policy import DEFAULT_POLICY, SCHEMA_VERSION, load_policy

SHIPPED = yaml.safe_load(DEFAULT_POLICY.read_text())


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return p


# ---- the shipped policy ---------------------------------------------------------------------------------

def test_the_shipped_policy_loads_with_the_documented_promise():
    q = load_policy().quality
    assert (q.alpha, q.multiplicity) == (0.05, "holm")
    assert isinstance(q.sequential, SequentialPolicy)
    assert (q.sequential.enabled, q.sequential.looks, q.sequential.spending) == (True, 5, "obf")
    assert 0 <= q.sequential.futility < 0.5 and q.sequential.min_items >= q.sequential.looks


def test_the_shipped_yaml_has_one_section_per_registered_check_naming_every_field():
    assert SHIPPED["schema_version"] == SCHEMA_VERSION == 2
    assert set(SHIPPED) == {"schema_version", *CHECKS}
    policy = load_policy()
    for name, spec in CHECKS.items():
        section = policy[name]
        assert isinstance(section, spec.section), name
        # the YAML is the one home of every default: it names each field, even those with a code default
        assert set(SHIPPED[name]) == {f.name for f in dataclasses.fields(spec.section)}, name
    assert set(SHIPPED["quality"]["sequential"]) == {f.name for f in dataclasses.fields(SequentialPolicy)}


def test_a_new_check_brings_its_own_strict_section(tmp_path: Path, monkeypatch):
    """Registering a check is what adds its section: the schema is built from the registry."""
    @dataclass(frozen=True)
    class Latency:
        __pydantic_config__ = {"extra": "forbid"}
        max_ms: float

    monkeypatch.setitem(CHECKS, "latency", CheckSpec("latency", Latency, lambda ev, p, level: [],
                                                     lambda check, variant: "#latency"))
    with pytest.raises(ConfigError, match=r"latency: Field required"):
        load_policy()  # the shipped file has no section for it yet
    shipped = tmp_path / "default.yaml"
    shipped.write_text(DEFAULT_POLICY.read_text() + "latency:\n  max_ms: 80\n")
    monkeypatch.setattr(policy_mod, "DEFAULT_POLICY", shipped)
    assert load_policy()["latency"] == Latency(80.0)
    assert load_policy(_write(tmp_path, "latency: {max_ms: 50}\n"))["latency"].max_ms == 50.0
    with pytest.raises(ConfigError, match=r"latency\.max_mss: unknown key"):
        load_policy(_write(tmp_path, "latency: {max_mss: 50}\n"))


# ---- a user's file --------------------------------------------------------------------------------------

def test_a_user_file_is_merged_key_by_key_over_the_shipped_one(tmp_path: Path):
    base = load_policy()
    mine = load_policy(_write(tmp_path, "quality:\n  margins: {8bit: 0.01}\n  multiplicity: bonferroni\n"
                                        "  sequential: {looks: 4}\nmemory: {max_gib: 20}\n"))
    q, b = mine.quality, base.quality
    assert q.margins == {"8bit": 0.01, "4bit": b.margins["4bit"]}  # a nested mapping merges
    assert q.multiplicity == "bonferroni" and mine["memory"].max_gib == 20
    assert q.sequential == dataclasses.replace(b.sequential, looks=4)  # and so does a nested section
    assert (q.alpha, q.min_items, q.recovery_min, q.metric_margins) == \
        (b.alpha, b.min_items, b.recovery_min, b.metric_margins)
    assert mine["performance"] == base["performance"] and mine["divergence"] == base["divergence"]


def test_a_merged_mapping_adds_to_the_shipped_one_and_a_scalar_replaces(tmp_path: Path):
    mine = load_policy(_write(tmp_path, "quality:\n  metric_margins: {word_perplexity: 0.5}\n"
                                        "divergence:\n  kl_p99_max: {4bit: 2.0}\n"))
    assert mine.quality.metric_margins == {"bits_per_byte": 0.03, "word_perplexity": 0.5}
    assert mine["divergence"].kl_p99_max == {"8bit": None, "4bit": 2.0}
    off = load_policy(_write(tmp_path, "performance: {throughput_margin: null}\n"))
    assert off["performance"].throughput_margin is None and off["performance"].require_slo is True


def test_an_empty_user_file_is_the_shipped_policy(tmp_path: Path):
    assert load_policy(_write(tmp_path, "")) == load_policy()


@pytest.mark.parametrize(("text", "message"), [
    ("qualty:\n  alpha: 0.05\n", r"Unknown policy section 'qualty'\. Did you mean: quality\?"),
    ("divergance: {}\n", r"Unknown policy section 'divergance'\. Did you mean: divergence\b"),
    ("quality:\n  multiplicity: bonferoni\n", r"quality\.multiplicity: Unknown value 'bonferoni'\. Did you mean: "
                                              r"bonferroni\?"),
    ("quality:\n  sequential: {spending: pocok}\n", r"quality\.sequential\.spending: Unknown value 'pocok'\. "
                                                    r"Did you mean: pocock\? Available: obf, pocock"),
    ("quality:\n  margins: {3bit: 0.01}\n", r"quality\.margins\.3bit: Unknown value '3bit'\. Did you mean: 8bit"),
    ("quality:\n  alpah: 0.05\n", r"quality\.alpah: unknown key"),
    ("quality:\n  sequential: {lookz: 3}\n", r"quality\.sequential\.lookz: unknown key"),
    ("schema_version: 1\n", r"schema_version: Unknown value '1'\. Available: 2"),
])
def test_an_unknown_name_is_one_line_naming_where_and_the_fix(tmp_path: Path, text: str, message: str):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_policy(p)
    assert str(err.value).startswith(f"{p}: ") and "\n" not in str(err.value)
    assert err.value.exit_code == EXIT_CONFIG


def test_a_misspelt_field_inside_a_section_suggests_the_field(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"quality\.alpah: .*(?i:did you mean): alpha"):
        load_policy(_write(tmp_path, "quality:\n  alpah: 0.05\n"))


@pytest.mark.parametrize(("text", "message"), [
    ("quality:\n  alpha: 0.7\n", r"quality: quality\.alpha must be in \(0, 0\.5\)"),
    ("quality:\n  alpha: 0\n", r"quality\.alpha must be in \(0, 0\.5\)"),
    ("quality:\n  sequential: {futility: 0.6}\n", r"quality\.sequential: quality\.sequential\.futility must be in "
                                                  r"\[0, 0\.5\)"),
    ("quality:\n  sequential: {looks: 1}\n", r"quality\.sequential: .*looks must be >= 2"),
    ("quality:\n  sequential: {min_items: 3}\n", r"min_items >= looks"),
    ("quality:\n  margins: {8bit: -0.01}\n", r"quality: quality margins must be >= 0"),
    ("quality:\n  metric_margins: {bits_per_byte: -0.01}\n", r"quality margins must be >= 0"),
    ("quality:\n  recovery_min: {4bit: 1.2}\n", r"quality\.recovery_min floors must be in \(0, 1\]"),
    ("quality:\n  min_items: {binary: 0}\n", r"quality\.min_items must be >= 1"),
    ("quality:\n  alpha: lots\n", r"quality\.alpha: Input should be a valid number"),
    ("quality:\n  sequential: {looks: five}\n", r"quality\.sequential\.looks: Input should be a valid integer"),
    ("quality:\n  allow_emulated: maybe\n", r"quality\.allow_emulated: Input should be a valid boolean"),
    ("quality: 3\n", r"quality: Input should be a dictionary"),
    ("performance: {throughput_margin: 1.5}\n", r"performance\.throughput_margin must be in \[0, 1\) or null"),
    ("memory: {max_gib: 0}\n", r"memory\.max_gib must be > 0 or null"),
    ("divergence:\n  top1_min: {8bit: 1.5}\n", r"divergence\.top1_min in \(0, 1\]"),
    ("- a list\n", r"a policy must be a YAML mapping"),
    ("quality: {alpha: 0.05\n", r"not valid YAML"),
])
def test_a_wrong_type_or_value_is_a_clear_one_line_error(tmp_path: Path, text: str, message: str):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_policy(p)
    assert str(err.value).startswith(f"{p}: ") and "\n" not in str(err.value)
    assert err.value.exit_code == EXIT_CONFIG


def test_a_missing_policy_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="gate policy not found") as err:
        load_policy(tmp_path / "nope.yaml")
    assert err.value.exit_code == EXIT_CONFIG


# ---- the promise's arithmetic -----------------------------------------------------------------------------

Q = load_policy().quality


def _q(**changes) -> QualityPolicy:
    return dataclasses.replace(Q, **changes)


@pytest.mark.parametrize(("multiplicity", "k", "expected"), [
    ("holm", 3, [0.05 / 3, 0.05 / 2, 0.05]),
    ("holm", 1, [0.05]),
    ("holm", 0, [0.05]),
    ("bonferroni", 4, [0.05 / 4]),
    ("none", 4, [0.05]),
])
def test_levels_are_every_level_the_gate_may_test_at(multiplicity: str, k: int, expected: list[float]):
    assert _q(multiplicity=multiplicity).levels(k) == pytest.approx(expected)


@pytest.mark.parametrize("multiplicity", ["holm", "bonferroni", "none"])
def test_holm_never_assigns_a_level_outside_levels_and_the_stop_is_the_strictest(multiplicity: str):
    """What the eval stage precomputes (levels) covers what the gate assigns (holm_levels), for any p-values;
    the eval stage's stopping level is the strictest of them, so a stop never claims more than the gate grants."""
    q = _q(multiplicity=multiplicity)
    rng = random.Random(0)
    for k in range(1, 7):
        allowed = q.levels(k)
        assert q.stopping_level(k) == min(allowed)
        for _ in range(50):
            present = rng.randint(1, k)  # declared variants may be absent: they still count in k
            pvals = {f"v{i}": rng.choice([rng.random() * 0.05, rng.random(), 0.0, 1.0]) for i in range(present)}
            got = holm_levels(pvals, k, q.alpha, q.multiplicity)
            assert set(got) == set(pvals)
            assert all(any(lv == pytest.approx(a) for a in allowed) for lv in got.values()), (k, pvals, got)


def test_holm_steps_down_and_stops_at_the_first_failure():
    got = holm_levels({"a": 0.001, "b": 0.02, "c": 0.03, "d": 0.2}, 4, 0.05, "holm")
    assert got == pytest.approx({"a": 0.05 / 4, "b": 0.05 / 3, "c": 0.05 / 3, "d": 0.05 / 3})
    # an absent declared variant still counts: two present of three declared start at alpha / 3
    assert holm_levels({"a": 0.001, "b": 0.001}, 3, 0.05, "holm") == pytest.approx({"a": 0.05 / 3, "b": 0.05 / 2})


def test_stopping_level_is_alpha_over_the_declared_family():
    assert Q.stopping_level(4) == pytest.approx(0.05 / 4)
    assert _q(multiplicity="bonferroni").stopping_level(2) == pytest.approx(0.025)
    assert _q(multiplicity="none").stopping_level(4) == 0.05
    assert Q.stopping_level(0) == 0.05


def test_margin_precedence_metric_then_recipe_then_family():
    q = _q(margins={"8bit": 0.02, "4bit": 0.05}, metric_margins={"bits_per_byte": 0.03})
    assert q.margin_for("4bit", "acc,none") == 0.05  # the family's
    assert q.margin_for("8bit", "acc_norm,none") == 0.02
    assert q.margin_for("4bit", "acc,none", recipe_margin=0.04) == 0.04  # the recipe's replaces the family's
    assert q.margin_for("4bit", "acc,none", recipe_margin=0.0) == 0.0  # even a zero margin
    assert q.margin_for("4bit", "bits_per_byte,none") == 0.03  # the metric's own, by its base name
    assert q.margin_for("4bit", "bits_per_byte,none", recipe_margin=0.04) == 0.03  # never replaced by a recipe's


def test_floor_precedence_recipe_then_family():
    q = _q(recovery_min={"8bit": 0.97, "4bit": 0.90})
    assert q.floor_for("4bit") == 0.90
    assert q.floor_for("4bit", recipe_floor=0.95) == 0.95
    assert q.floor_for("reference") is None  # no floor for a family the policy does not name


def test_the_sections_validate_when_built_directly_too():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0\.5\)"):
        _q(alpha=0.5)
    with pytest.raises(ValueError, match="margins must be >= 0"):
        _q(metric_margins={"bits_per_byte": -1.0})
    with pytest.raises(ValueError, match="futility"):
        dataclasses.replace(Q.sequential, futility=0.5)
    with pytest.raises(ValueError, match="looks must be >= 2"):
        dataclasses.replace(Q.sequential, looks=1)
