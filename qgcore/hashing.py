"""Content keys and file hashes: one helper for every cache key, one suffix list for model files.

A cache key is the sha256 of a canonical JSON of everything that moves a number; checkpoint files are
recorded with size, mtime and sha256 so later stages can prove they measure what was built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Files that define a model or checkpoint (weights, configs, tokenizer, chat template). One list: what is
# copied as the reference, hashed into a revision, and verified before a checkpoint is served or gated.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja", ".gguf")
KEY_LEN = 16


def content_key(obj: Any) -> str:
    """Short sha256 of the canonical JSON of `obj` (sorted keys): equal inputs, equal keys."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LEN]


def bytes_key(data: bytes) -> str:
    """Short sha256 of raw bytes (a file's or a text's content) for provenance ids and cache keys."""
    return hashlib.sha256(data).hexdigest()[:KEY_LEN]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)


def cached_sha256(path: Path, cache: Path | None) -> str:
    """A file's sha256, remembered under `cache` by (path, size, mtime): a rerun reads no unchanged file (the
    integrity check that follows uses the same fast path, and hashes whatever changed)."""
    if cache is None:
        return file_sha256(path)
    st = path.stat()
    book = cache / "file-hashes.json"
    known: dict[str, Any] = {}
    if book.is_file():
        try:
            known = json.loads(book.read_text())
        except json.JSONDecodeError:
            known = {}
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    entry = known.get(str(path.resolve()))
    if entry and entry[0] == stamp:
        return str(entry[1])
    digest = file_sha256(path)
    known[str(path.resolve())] = [stamp, digest]
    book.parent.mkdir(parents=True, exist_ok=True)
    tmp = book.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(known))
    tmp.replace(book)
    return digest


def cached_file_key(path: Path, cache: Path | None = None) -> str:
    return cached_sha256(path, cache)[:KEY_LEN]


def hash_model_dir(path: Path, cache: Path | None = None) -> str:
    """Content hash of the files that define a model, so a changed model changes every cache key."""
    h = hashlib.sha256()
    for f in model_files(path):
        h.update(str(f.relative_to(path)).encode())
        h.update(cached_sha256(f, cache).encode())
    return "sha256:" + h.hexdigest()[:KEY_LEN]
