"""Gate policy YAML -> reports.gate.GatePolicy, through a strict schema (unknown keys fail)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qgcore.errors import ConfigError, did_you_mean, format_validation_error
from qgcore.vocab import MULTIPLICITY, QuantFamily
from reports.gate import GatePolicy

DEFAULT_POLICY = Path(__file__).resolve().parent / "policy.default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# No defaults here or in reports.gate.GatePolicy: the shipped policy.default.yaml is the one home of every
# default, and a user's policy file is merged over it key by key (so it may name only what it changes).
class _Quality(_Strict):
    margins: dict[QuantFamily, float]
    metric_margins: dict[str, float]
    recovery_min: dict[QuantFamily, float]
    min_items: int = Field(ge=1)
    allow_emulated: bool
    alpha: float = Field(gt=0, lt=0.5)
    multiplicity: str


class _Performance(_Strict):
    throughput_floor_vs_bf16: float | None = Field(gt=0)
    require_slo: bool


class _Memory(_Strict):
    max_gib: float | None = Field(gt=0)


class _Divergence(_Strict):
    kl_p99_max: dict[QuantFamily, float | None]
    top1_min: dict[QuantFamily, float | None]


class PolicyFile(_Strict):
    schema_version: Literal[1]
    quality: _Quality
    performance: _Performance
    memory: _Memory
    divergence: _Divergence


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"gate policy not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a policy must be a YAML mapping")
    return data


def load_policy(path: Path | None = None) -> GatePolicy:
    """The shipped policy, with `path` (if given) merged over it key by key; strict schema, one-line errors."""
    data = _read(DEFAULT_POLICY)
    if path is not None:
        data = _merge(data, _read(path))
    path = path or DEFAULT_POLICY
    try:
        pf = PolicyFile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(path, err)) from None
    if pf.quality.multiplicity not in MULTIPLICITY:
        raise ConfigError(f"{path}: quality.multiplicity: " + did_you_mean(pf.quality.multiplicity, MULTIPLICITY,
                                                                            "correction"))
    if any(m < 0 for m in [*pf.quality.margins.values(), *pf.quality.metric_margins.values()]):
        raise ConfigError(f"{path}: margins must be >= 0")
    caps = {str(k): v for k, v in pf.divergence.kl_p99_max.items() if v is not None}
    floors = {str(k): v for k, v in pf.divergence.top1_min.items() if v is not None}
    if any(v <= 0 for v in caps.values()) or any(not 0 < v <= 1 for v in floors.values()):
        raise ConfigError(f"{path}: divergence.kl_p99_max must be > 0 and divergence.top1_min in (0, 1]")
    return GatePolicy(
        margins={str(k): v for k, v in pf.quality.margins.items()}, metric_margins=dict(pf.quality.metric_margins),
        recovery_min={str(k): v for k, v in pf.quality.recovery_min.items()}, min_items=pf.quality.min_items,
        throughput_floor_vs_bf16=pf.performance.throughput_floor_vs_bf16, require_slo=pf.performance.require_slo,
        max_memory_bytes=int(pf.memory.max_gib * 2**30) if pf.memory.max_gib else None,
        allow_emulated=pf.quality.allow_emulated, alpha=pf.quality.alpha, multiplicity=pf.quality.multiplicity,
        kl_p99_max=caps, top1_min=floors,
    )
