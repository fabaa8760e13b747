"""Checkpoint integrity: the manifest records every file's size, mtime and sha256; later stages verify.

Fast path: size and mtime unchanged means unchanged (no read). When either differs, or on `full=True`
(`--verify`), the file is hashed: a touched-but-identical file passes, an edited one does not. A
checkpoint changed after it was measured must never be scored, benched, reported or promoted on old
numbers, so every mismatch is an error that names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgcore.errors import IntegrityError
from qgcore.hashing import content_key, file_sha256, model_files


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "mtime_ns", "sha256"}} for every model file under `folder`."""
    out = {}
    for f in model_files(folder):
        st = f.stat()
        out[str(f.relative_to(folder))] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)}
    return out


def files_key(files: dict[str, dict[str, Any]]) -> str:
    """A key over the files' content hashes (not their mtimes): what every cache key of a checkpoint uses."""
    return content_key({name: rec["sha256"] for name, rec in files.items()})


def verify_files(folder: Path, files: dict[str, dict[str, Any]], *, full: bool = False, what: str = "") -> None:
    """Raise IntegrityError naming the first file that is missing, added, or changed since it was recorded."""
    label = f"{what}: " if what else ""
    if not files:
        raise IntegrityError(f"{label}the manifest records no checkpoint files; rerun `make quantize`")
    present = {str(f.relative_to(folder)) for f in model_files(folder)} if folder.is_dir() else set()
    for name, rec in sorted(files.items()):
        path = folder / name
        if name not in present:
            raise IntegrityError(f"{label}checkpoint file {path} is missing (recorded at quantize time); "
                                 "rerun `make quantize --force` for this recipe")
        st = path.stat()
        if not full and st.st_size == rec["bytes"] and st.st_mtime_ns == rec["mtime_ns"]:
            continue
        if st.st_size != rec["bytes"] or file_sha256(path) != rec["sha256"]:
            raise IntegrityError(f"{label}checkpoint file {path} changed after it was built and measured; "
                                 "rerun `make quantize` (and eval/bench) for this recipe")
    extra = sorted(present - set(files))
    if extra:
        raise IntegrityError(f"{label}checkpoint file {folder / extra[0]} was added after the checkpoint was built; "
                             "remove it or rerun `make quantize`")
