"""What the eval and bench stages share: the variants to measure (bf16 first, integrity checked), the
serving environment's vLLM version, and the key a measured checkpoint contributes to every cache key."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

from evals.serve import serve_python
from qgcore.artifacts import CheckpointManifest
from qgcore.errors import ArtifactError
from qgcore.hashing import content_key
from qgcore.integrity import files_key, verify_files


@lru_cache(maxsize=1)
def vllm_version() -> str:
    """Version of vLLM in the serving environment (another venv), asked once."""
    try:
        out = subprocess.run([serve_python(), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unavailable"


def variant_manifests(run_dir: Path, recipes: list[str] | None, *, verify: bool = False) -> list[CheckpointManifest]:
    """Manifests of the requested (default: all finished) variants, bf16 first; bf16 is required.

    Every checkpoint is checked against its manifest's file records before anything is measured.
    """
    if not run_dir.is_dir():
        raise ArtifactError(f"no run folder {run_dir}: run `make quantize` first")
    names = recipes or sorted(p.parent.name for p in run_dir.glob("*/manifest.json"))
    if "bf16" not in names:
        names = ["bf16", *names]
    manifests = [CheckpointManifest.read(run_dir / n / "manifest.json") for n in names]
    for m in manifests:
        verify_files(run_dir / m.recipe / m.checkpoint_dir, m.files, full=verify, what=m.recipe)
    return sorted(manifests, key=lambda m: (m.recipe != "bf16", names.index(m.recipe)))


def checkpoint_key(manifest: CheckpointManifest) -> str:
    """What a checkpoint contributes to a cache key: its build key and the hashes of the files measured."""
    return content_key({"build": manifest.content_key, "files": files_key(manifest.files)})
