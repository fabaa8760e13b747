"""The gate policy: the shipped YAML is the one home of the defaults; a user file is merged over it."""

from pathlib import Path

import pytest

from qgcore.errors import ConfigError
from reports.policy import DEFAULT_POLICY, load_policy


def test_a_partial_policy_changes_only_what_it_names(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text("quality:\n  margins: {8bit: 0.01}\n  multiplicity: none\nmemory: {max_gib: 20}\n")
    base, mine = load_policy(), load_policy(p)
    assert mine.margins == {"8bit": 0.01, "4bit": base.margins["4bit"]}
    assert (mine.multiplicity, mine.max_memory_bytes) == ("none", 20 * 2**30)
    assert (mine.min_items, mine.alpha, mine.recovery_min) == (base.min_items, base.alpha, base.recovery_min)


@pytest.mark.parametrize(("text", "message"), [
    ("quality:\n  margns: {8bit: 0.01}\n", "quality.margns: unknown key"),
    ("quality:\n  multiplicity: bonferoni\n", "Did you mean: bonferroni"),
    ("quality:\n  margins: {8bit: -0.01}\n", "margins must be >= 0"),
    ("quality:\n  margins: {3bit: 0.01}\n", "quality.margins.3bit"),
    ("- a list\n", "must be a YAML mapping"),
])
def test_bad_policies_fail_with_one_line(tmp_path: Path, text: str, message: str):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_policy(p)


def test_the_shipped_policy_names_every_key():
    import yaml

    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    assert set(data["quality"]) == {"margins", "metric_margins", "recovery_min", "min_items", "allow_emulated",
                                    "alpha", "multiplicity"}
    assert set(data["performance"]) == {"throughput_floor_vs_bf16", "require_slo"} and "max_gib" in data["memory"]


def test_divergence_caps_are_off_by_default_and_set_per_family(tmp_path: Path):
    assert load_policy().kl_p99_max == {} and load_policy().top1_min == {}
    p = tmp_path / "p.yaml"
    p.write_text("divergence:\n  kl_p99_max: {4bit: 2.0}\n  top1_min: {8bit: 0.9}\n")
    mine = load_policy(p)
    assert mine.kl_p99_max == {"4bit": 2.0} and mine.top1_min == {"8bit": 0.9}
    p.write_text("divergence:\n  top1_min: {8bit: 1.5}\n")
    with pytest.raises(ConfigError, match="top1_min in"):
        load_policy(p)
    p.write_text("divergence:\n  kl_p99: {8bit: 1}\n")
    with pytest.raises(ConfigError, match="divergence.kl_p99: unknown key"):
        load_policy(p)
