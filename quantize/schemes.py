"""Scheme registry: *how* each recipe scheme becomes llmcompressor modifiers, and what it must produce.

Config (the recipe) says what; a handler registered here by name says how, as torchao's
`quantize_(model, config)` does. llmcompressor is imported lazily so the schema, the CLI and the gate
stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Handlers receive a quantize.recipe.Recipe; the registry does not import it, so imports run one way
# (recipe -> schemes) and the schema validates scheme names against this registry.
Recipe = Any


@dataclass(frozen=True)
class SchemeHandler:
    name: str
    needs_calibration: bool
    needs_group_size: bool = False
    fixed_group_size: int | None = None
    # what the saved config.json's quantization_config must say; checked after oneshot
    expect: dict[str, Any] = field(default_factory=dict)
    build: Callable[[Recipe], list[Any]] | None = None
    grid_search: bool = False  # takes quant.grid_points (AWQ's scale search)
    # what config.json's quantization_config will say, in qgcore.artifacts.quantization_summary's shape: the
    # kernel preflight judges a target GPU from it before anything is built
    summary: Callable[[Recipe], dict[str, Any]] = lambda r: {"quantized": False}


SCHEMES: dict[str, SchemeHandler] = {}


def register(handler: SchemeHandler) -> SchemeHandler:
    SCHEMES[handler.name] = handler
    return handler


def _w4_groups(recipe: Recipe) -> dict[str, Any]:
    q = recipe.quant
    return {
        "group_0": {
            "targets": list(q.targets),
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": q.symmetric,
                "strategy": "group",
                "group_size": q.group_size,
            },
        }
    }


# FP8 KV cache with static per-tensor scales calibrated on the calibration set (vLLM reads k_scale/v_scale).
_KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _fp8(recipe: Recipe, kv: bool = False) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    kwargs: dict[str, Any] = {"kv_cache_scheme": dict(_KV_FP8)} if kv else {}
    return [
        QuantizationModifier(
            targets=list(recipe.quant.targets), scheme="FP8_DYNAMIC", ignore=list(recipe.quant.ignore), **kwargs
        )
    ]


def _gptq(recipe: Recipe) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=_w4_groups(recipe), ignore=list(recipe.quant.ignore))]


def _awq(recipe: Recipe) -> list[Any]:
    # llmcompressor 0.14: AWQModifier only rescales; a quantizing modifier must follow it.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    grid = {"n_grid": recipe.quant.grid_points} if recipe.quant.grid_points is not None else {}
    return [
        AWQModifier(**grid),
        QuantizationModifier(config_groups=_w4_groups(recipe), ignore=list(recipe.quant.ignore)),
    ]


def _nvfp4(recipe: Recipe) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(targets=list(recipe.quant.targets), scheme="NVFP4", ignore=list(recipe.quant.ignore))]


_FP8_EXPECT = {"format": "float-quantized", "weights.num_bits": 8, "weights.type": "float",
               "input_activations.dynamic": True}
_W4_EXPECT = {"format": "pack-quantized", "weights.num_bits": 4, "weights.type": "int",
              "weights.strategy": "group", "input_activations": None}

def _planned(fmt: str, bits: int, kind: str, group: int | None, act_bits: int | None) -> Callable[[Recipe], dict]:
    def summary(r: Recipe) -> dict[str, Any]:
        return {"quantized": True, "format": fmt, "ignore": list(r.quant.ignore),
                "weights": {"num_bits": bits, "type": kind, "group_size": group or r.quant.group_size},
                "input_activations": {"num_bits": act_bits} if act_bits else None}
    return summary


register(SchemeHandler("none", needs_calibration=False))
register(SchemeHandler("fp8_dynamic", needs_calibration=False, expect=_FP8_EXPECT, build=_fp8,
                       summary=_planned("float-quantized", 8, "float", None, 8)))
register(
    SchemeHandler("fp8_dynamic_kv", needs_calibration=True, expect={**_FP8_EXPECT, "kv_cache.num_bits": 8},
                  build=lambda r: _fp8(r, kv=True), summary=_planned("float-quantized", 8, "float", None, 8))
)
register(SchemeHandler("gptq_w4a16", needs_calibration=True, needs_group_size=True, expect=_W4_EXPECT, build=_gptq,
                       summary=_planned("pack-quantized", 4, "int", None, None)))
register(SchemeHandler("awq_w4a16", needs_calibration=True, needs_group_size=True, expect=_W4_EXPECT, build=_awq,
                       grid_search=True, summary=_planned("pack-quantized", 4, "int", None, None)))
register(
    SchemeHandler("nvfp4", needs_calibration=True, fixed_group_size=16,
                  expect={"format": "nvfp4-pack-quantized", "weights.num_bits": 4, "weights.type": "float",
                          "weights.group_size": 16}, build=_nvfp4,
                  summary=_planned("nvfp4-pack-quantized", 4, "float", 16, 4))
)


def _lookup(group: dict[str, Any], qcfg: dict[str, Any], dotted: str) -> Any:
    if dotted == "format":
        return group.get("format", qcfg.get("format"))
    if dotted.startswith("kv_cache."):
        kv = qcfg.get("kv_cache_scheme") or {}
        return kv.get(dotted.split(".", 1)[1])
    node: Any = group
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_quantization_config(recipe: Recipe, config: dict[str, Any]) -> list[str]:
    """Problems with a saved config.json versus what the recipe promised (empty list = as promised).

    llmcompressor silently saves an unquantized copy when a recipe matches no modifier, so every
    checkpoint is checked here rather than trusted.
    """
    handler = SCHEMES[recipe.quant.scheme]
    qcfg = config.get("quantization_config")
    if handler.name == "none":
        return ["reference checkpoint unexpectedly has a quantization_config"] if qcfg else []
    if not qcfg:
        return ["config.json has no quantization_config: the recipe quantized nothing"]
    groups = list((qcfg.get("config_groups") or {}).values())
    if not groups:
        return ["quantization_config has no config_groups"]
    problems = []
    expect = dict(handler.expect)
    if handler.needs_group_size:
        expect["weights.group_size"] = recipe.quant.group_size
    for key, want in expect.items():
        got = _lookup(groups[0], qcfg, key)
        if got != want:
            problems.append(f"quantization_config {key} is {got!r}, recipe promised {want!r}")
    ignored = set(qcfg.get("ignore") or [])
    for name in recipe.quant.ignore:
        if name not in ignored and not any(i.endswith(name) for i in ignored):
            problems.append(f"'{name}' should be ignored but quantization_config.ignore is {sorted(ignored)}")
    return problems
