"""What the eval and bench stages share: the variants to measure (the reference first, integrity checked),
the serving environment's vLLM version, and the key a measured checkpoint contributes to every cache key."""

from __future__ import annotations

import email.parser
import subprocess
from functools import lru_cache
from pathlib import Path

from qgcore.artifacts import CheckpointManifest
from qgcore.errors import ArtifactError
from qgcore.hashing import content_key
from qgcore.integrity import files_key, verify_files
from qgcore.vocab import reference_of


@lru_cache(maxsize=4)
def vllm_version(python: str) -> str:
    """vLLM's version in the serving venv: read from its dist-info (milliseconds), else asked of the
    interpreter once (a venv laid out otherwise)."""
    venv = Path(python).parent.parent
    for meta in sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info/METADATA")):
        fields = email.parser.Parser().parsestr(meta.read_text(errors="replace"), headersonly=True)
        if fields.get("Version"):
            return str(fields["Version"])
    try:
        out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unavailable"


def variant_manifests(run_dir: Path, recipes: list[str] | None, *, verify: bool = False) -> list[CheckpointManifest]:
    """Manifests of the requested (default: all finished) variants, the reference first; it is required.

    Every checkpoint is checked against its manifest's file records before anything is measured.
    """
    if not run_dir.is_dir():
        raise ArtifactError(f"no run folder {run_dir}: run `make quantize` first")
    present = {p.parent.name: p for p in run_dir.glob("*/manifest.json")}
    all_manifests = {n: CheckpointManifest.read(p) for n, p in sorted(present.items())}
    try:
        ref = reference_of({n: m.family for n, m in all_manifests.items()})
    except ValueError as err:
        raise ArtifactError(f"{run_dir}: {err}; run `make quantize` with the reference recipe") from None
    names = list(dict.fromkeys([ref, *(recipes or sorted(all_manifests))]))
    missing = [n for n in names if n not in all_manifests]
    if missing:
        raise ArtifactError(f"{run_dir} has no manifest for {', '.join(missing)}: run `make quantize RECIPES="
                            f"{','.join(missing)}` first")
    manifests = [all_manifests[n] for n in names]
    for m in manifests:
        verify_files(run_dir / m.recipe / m.checkpoint_dir, m.files, full=verify, what=m.recipe)
    return manifests


def checkpoint_key(manifest: CheckpointManifest) -> str:
    """What a checkpoint contributes to a cache key: its build key and the hashes of the files measured."""
    return content_key({"build": manifest.content_key, "files": files_key(manifest.files)})
