"""The one-way plan, checked from the code's own imports (the README's diagram is this table).

    quantgate  (CLI, pipeline, benchmarks)      imports anything below
    quantize | evals | reports  (stages)        import qgcore and their own package only
    qgcore     (errors, artifacts, hashing, integrity, paths, provenance, corpus, stats, serving, vocab)
                                                imports nothing of ours above it
Stages read each other only through qgcore.artifacts (the versioned JSON they write).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"qgcore": 0, "quantize": 1, "evals": 1, "reports": 1, "quantgate": 2}
STDLIB_ONLY = ("reports/gate.py", "qgcore/errors.py", "qgcore/vocab.py")


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
    allowed = {"qgcore.vocab", "qgcore.errors"}
    import sys

    for mod in _imports(ROOT / rel):
        top = mod.split(".")[0]
        assert top in sys.stdlib_module_names or top == "__future__" or mod in allowed, f"{rel} imports {mod}"


def test_the_checker_sees_a_violation(tmp_path: Path):
    """The rule above can fail: an upward import is found by the same parser."""
    bad = tmp_path / "x.py"
    bad.write_text("from quantgate.cli import main\nimport evals.serve as s\n")
    assert _imports(bad) == ["quantgate.cli", "evals.serve"]
