"""Gate policy YAML -> reports.gate.GatePolicy, strictly: one section per registered check (reports.gate.CHECKS),
each validated by its own dataclass (unknown keys fail, names are Literals, ranges are checked), so adding
a check adds its section here by itself. The shipped policy.default.yaml is the one home of every default;
a user's file is merged over it key by key (so it may name only what it changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, ValidationError, create_model

from qgcore.errors import ConfigError, did_you_mean, format_validation_error
from reports.gate import CHECKS, GatePolicy

DEFAULT_POLICY = Path(__file__).resolve().parent / "policy.default.yaml"
SCHEMA_VERSION = 2  # 2: one alpha (family-wise, one-sided), Holm, sequential scoring, sections by registry


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


def _schema() -> type:
    fields: dict[str, Any] = {"schema_version": (Literal[2], ...)}
    fields |= {name: (spec.section, ...) for name, spec in CHECKS.items()}
    model: type = create_model("PolicyFile", __config__=ConfigDict(extra="forbid"), **fields)
    return model


def load_policy(path: Path | None = None) -> GatePolicy:
    """The shipped policy, with `path` (if given) merged over it key by key; strict schema, one-line errors."""
    data = _read(DEFAULT_POLICY)
    if path is not None:
        mine = _read(path)
        for key in mine:
            if key not in data:
                raise ConfigError(f"{path}: " + did_you_mean(key, list(data), "policy section"))
        data = _merge(data, mine)
    schema = _schema()
    try:
        pf = schema.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as err:
        raise ConfigError(format_validation_error(path or DEFAULT_POLICY, err, schema)) from None
    return GatePolicy({name: getattr(pf, name) for name in CHECKS})
