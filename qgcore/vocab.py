"""Names every layer shares, stdlib only (the gate imports this without pydantic or numpy).

Statuses are codes, never prose: every later stage branches on the code, and `reason` fields are for
people only. A variant-level code says what happened to its server; a task-level code what happened to
one task on that server; a diagnostic's code (divergence) never decides a variant's fate by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, get_args

EMULATED = "emulated (transformers)"  # the engine label of scores computed without vLLM
QuantFamily = Literal["8bit", "4bit"]  # which margins and floors apply to a quantized recipe
Family = Literal["reference", "8bit", "4bit"]  # a recipe's family; the one "reference" is what all compare with
QUANT_FAMILIES: tuple[str, ...] = get_args(QuantFamily)
REFERENCE: Family = "reference"

# eval.json / bench.json: what happened to the variant's server
VariantStatus = Literal[
    "served",  # vLLM served it and every asked-for task has a result (scored, skipped or failed on its own)
    "emulated",  # vLLM has no kernel here; scored through transformers, labelled everywhere
    "unsupported",  # no kernel for this scheme/shape on this platform (preflight or vLLM's own refusal)
    "failed:start",  # the server would not start for another reason (a broken checkpoint, a bad flag)
    "failed:crash",  # the server died while scoring or under load
    "failed:checkpoint",  # damaged files (preflight) or a config that disagrees with the manifest: never served
    "skipped:unservable",  # bench only: eval already could not serve it with these flags
    "failed:load",  # bench only: the load generator failed (levels kept)
]
# eval/<task>.json: one task on one server
TaskStatus = Literal[
    "scored",
    "skipped:unreachable",  # dataset unreachable and not in the local cache: never substituted
    "failed:scoring",  # requests errored or lm-eval raised while scoring this task (the server alive)
    "failed:context",  # a prompt plus its generation budget does not fit the served context
]
# divergence.json: a diagnostic
DiagnosticStatus = Literal["measured", "skipped:unserved", "failed:fetch"]

VARIANT_STATUSES: tuple[str, ...] = get_args(VariantStatus)
TASK_STATUSES: tuple[str, ...] = get_args(TaskStatus)
SCORED_VARIANT = ("served", "emulated")  # statuses whose tasks carry scores
SERVED = "served"
SCORED = "scored"


def failed(status: str | None) -> bool:
    """A failure of the thing itself (not 'unsupported here', not 'skipped')."""
    return bool(status) and str(status).startswith("failed:")


def reference_of(families: Mapping[str, str]) -> str:
    """The one recipe whose family is `reference`: every comparison is against it. Raises if none or two."""
    refs = sorted(name for name, fam in families.items() if fam == REFERENCE)
    if len(refs) != 1:
        what = "no recipe" if not refs else f"{len(refs)} recipes ({', '.join(refs)})"
        raise ValueError(f"{what} with family: reference; exactly one is the reference every variant is compared with")
    return refs[0]


def reference_first(names: Iterable[str], reference: str) -> list[str]:
    names = list(dict.fromkeys(names))
    return [reference, *[n for n in names if n != reference]] if reference in names else names
