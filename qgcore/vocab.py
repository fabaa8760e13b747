"""Names every layer shares, stdlib only (the gate imports this without pydantic or numpy)."""

from __future__ import annotations

from typing import Literal, get_args

EMULATED = "emulated (transformers)"  # the engine label of scores computed without vLLM
QuantFamily = Literal["8bit", "4bit"]  # which margins and floors apply to a quantized recipe
Family = Literal["reference", "8bit", "4bit"]  # a recipe's family; "reference" is bf16
QUANT_FAMILIES: tuple[str, ...] = get_args(QuantFamily)
MULTIPLICITY: tuple[str, ...] = ("bonferroni", "none")  # family-wise corrections the gate knows
