"""The one-way plan, checked from the code's own imports (the README's diagram is this table).

    quantgate  (CLI, pipeline, benchmarks)      imports anything below
    quantize | evals | reports  (stages)        import qgcore and their own package only
    qgcore     (errors, artifacts, hashing, integrity, paths, provenance, corpus, stats, serving, vocab,
                quality, device, kernels, ...)  imports nothing of ours above it
Stages read each other only through qgcore.artifacts (the versioned JSON they write).

Some modules promise "stdlib only" (the gate runs in CI on artifacts copied from a GPU box, without torch,
pydantic or numpy). The gate reads its policy dataclasses from qgcore.quality (one home for margins and
levels, shared with the eval stage's stopping rule), which is itself stdlib-only; so the rule is checked
transitively: a stdlib-only module may import first-party code only if that module is stdlib-only too.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"qgcore": 0, "quantize": 1, "evals": 1, "reports": 1, "quantgate": 2}
STDLIB_ONLY = ("reports/gate.py", "qgcore/errors.py", "qgcore/vocab.py", "qgcore/quality.py", "qgcore/device.py",
               "qgcore/kernels.py", "quantgate/doctor.py")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _modules():
    for pkg in LAYER:
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_upward_or_sideways(path: Path):
    pkg = path.relative_to(ROOT).parts[0]
    for mod in _imports(path):
        top = mod.split(".")[0]
        if top not in LAYER or top == pkg:
            continue
        assert LAYER[top] < LAYER[pkg], f"{path.relative_to(ROOT)} imports {mod}: {top} is not below {pkg}"


@pytest.mark.parametrize("rel", STDLIB_ONLY)
def test_the_gate_stays_stdlib_only(rel: str):
    # first-party imports are allowed only into modules that keep the same promise (checked by this same test)
    allowed = {rel_path.removesuffix(".py").replace("/", ".") for rel_path in STDLIB_ONLY}
    for mod in _imports(ROOT / rel):
        top = mod.split(".")[0]
        assert top in sys.stdlib_module_names or top == "__future__" or mod in allowed, f"{rel} imports {mod}"


def test_every_module_that_says_stdlib_only_is_checked():
    """A docstring's "stdlib only" is a promise this file keeps: no such module escapes the check above."""
    claims = {str(p.relative_to(ROOT)) for p in _modules()
              if "stdlib only" in (ast.get_docstring(ast.parse(p.read_text())) or "").lower().replace("-", " ")}
    assert "reports/gate.py" in claims and claims <= set(STDLIB_ONLY), sorted(claims - set(STDLIB_ONLY))


def test_the_checker_sees_a_violation(tmp_path: Path):
    """The rule above can fail: an upward import is found by the same parser."""
    bad = tmp_path / "x.py"
    bad.write_text("from quantgate.cli import main\nimport evals.serve as s\n")
    assert _imports(bad) == ["quantgate.cli", "evals.serve"]
