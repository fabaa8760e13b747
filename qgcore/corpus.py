"""Real English text available offline on any machine: docstrings of the Python standard library.

Read at run time from the installed interpreter (nothing is copied into the repo). Modules are split
by a stable hash into two disjoint halves so that calibration text never reappears in the perplexity
eval: `calibration` for quantize, `heldout` for evals and divergence tests.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Literal

from qgcore.hashing import bytes_key

Split = Literal["calibration", "heldout"]
CORPUS_ID = "python-stdlib-docstrings"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip"}
    return sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & skip))


def _split_of(rel: str) -> Split:
    return "calibration" if hashlib.sha256(rel.encode()).digest()[0] % 2 == 0 else "heldout"


@lru_cache(maxsize=4)
def documents(split: Split, min_chars: int = 200) -> tuple[str, ...]:
    """Docstrings of at least `min_chars`, unique, in a stable order (by file, then position).

    The same docstring can sit in two modules (copied helpers); held-out text drops any that also
    occur on the calibration side, so the two splits share no document.
    """
    docs = dict.fromkeys(_split_docs(split, min_chars))
    if split == "heldout":
        for d in _split_docs("calibration", min_chars):
            docs.pop(d, None)
    return tuple(docs)


def _parse(source: str) -> ast.Module:
    """ast.parse, once more on CPython 3.11's spurious "AST constructor recursion depth mismatch": before
    3.11.8 its recursion-depth counter is interpreter-wide, so another parse interleaved with this one (a thread
    switch during a garbage collection) can trip it (cpython#106905). The text is the same, so the second parse
    is the real answer."""
    try:
        return ast.parse(source)
    except SystemError:
        return ast.parse(source)


@lru_cache(maxsize=4)
def _split_docs(split: Split, min_chars: int) -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in _stdlib_files():
        rel = str(path.relative_to(root))
        if _split_of(rel) != split:
            continue
        try:
            tree = _parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc.isascii():
                    out.append(doc.strip())
    return tuple(out)


def sample(split: Split, n: int, seed: int, min_chars: int = 200) -> list[str]:
    """`n` documents chosen with `seed`; raises if the corpus is smaller than asked."""
    docs = documents(split, min_chars)
    if n > len(docs):
        raise ValueError(f"{CORPUS_ID}/{split} has {len(docs)} documents of >= {min_chars} chars; asked {n}")
    rng = random.Random(seed)
    return rng.sample(list(docs), n)


def corpus_hash(split: Split, min_chars: int = 200) -> str:
    return bytes_key("".join(documents(split, min_chars)).encode())
