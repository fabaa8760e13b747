"""Resolve the run context once, from the command line and the environment, and keep run.json current.

Everything a stage needs about *where* it runs is decided here, at the top, and handed down: the run
folder, the platform (this machine's GPU or CPU, or a Ray cluster's GPU nodes), the target a verdict is
scoped to, the serving venv, the cache, tensor-parallel overrides and a context cap. run.json records the
run's declared recipe set (the gate's family), the reference, the target and each variant's serving plan.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import replace
from pathlib import Path

from qgcore.artifacts import CheckpointManifest, RunRecord
from qgcore.device import Platform, detect, parse_target
from qgcore.errors import ArtifactError, ConfigError
from qgcore.paths import CACHE_DIR, PROJECT_ROOT, slug_for
from qgcore.run import Executor, RunContext
from qgcore.serving import pinned_environment
from qgcore.vocab import reference_first, reference_of


def serve_python() -> str:
    """The serving venv's interpreter: QUANTGATE_SERVE_PYTHON, else .venvs/serve (make setup builds it)."""
    env = os.environ.get("QUANTGATE_SERVE_PYTHON")
    if env:
        return env
    venv = PROJECT_ROOT / ".venvs" / "serve" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def parse_tensor_parallel(value: str | None) -> dict[str, int]:
    """`--tensor-parallel 2` (every variant) or `bf16=4,fp8=2` (per variant; `*=N` for the rest)."""
    if not value:
        return {}
    out: dict[str, int] = {}
    for part in value.split(","):
        name, eq, n = part.rpartition("=")
        if eq and not name.strip():
            raise ConfigError(f"--tensor-parallel '{value}': '{part}' names no variant (use N, name=N or *=N)")
        try:
            size = int(n)
        except ValueError:
            raise ConfigError(f"--tensor-parallel '{value}': give N or name=N,... with integers") from None
        if size < 1 or size & (size - 1):
            raise ConfigError(f"--tensor-parallel '{value}': sizes must be powers of two (1, 2, 4, 8)")
        key = name.strip() or "*"
        if key in out:
            raise ConfigError(f"--tensor-parallel '{value}': {key} is given twice")
        out[key] = size
    return out


def resolve(*, runs_root: Path, model: str | None, target_gpu: str | None = None, executor: Executor = "local",
            tensor_parallel: str | None = None, max_model_len: int | None = None, startup_timeout: float | None = None,
            platform: Platform | None = None, cpu_threads: int | None = None) -> RunContext:
    """The run context for one command. `platform`: where servers run when it is not this machine (a Ray
    cluster's GPU nodes, from its resources)."""
    if max_model_len is not None and max_model_len < 16:
        raise ConfigError(f"--max-model-len {max_model_len}: give a context of at least 16 tokens")
    if startup_timeout is not None and startup_timeout <= 0:
        raise ConfigError(f"--startup-timeout {startup_timeout}: give seconds > 0")
    here = platform or detect(os.environ.get("QUANTGATE_DEVICE"))
    target = parse_target(target_gpu) or replace(here, source="the platform measured")
    return RunContext(run_dir=runs_root / slug_for(model), model=model, platform=here, target=target,
                      cache_dir=CACHE_DIR, serve_python=serve_python(), executor=executor, cpu_threads=cpu_threads,
                      tensor_parallel=parse_tensor_parallel(tensor_parallel), max_model_len=max_model_len,
                      startup_timeout_s=startup_timeout, pinned_env=pinned_environment(os.environ))


def _manifests(run_dir: Path) -> dict[str, CheckpointManifest]:
    return {p.parent.name: CheckpointManifest.read(p) for p in sorted(run_dir.glob("*/manifest.json"))}


def record_run(ctx: RunContext, *, declared: list[str] | None = None,
               families: dict[str, str] | None = None) -> RunRecord:
    """Write run.json: the declared recipe set only grows (deleting a variant's folder never shrinks the gate's
    family); the serving plan is each present variant's under this context."""
    path = ctx.run_dir / "run.json"
    old = RunRecord.read(path) if path.is_file() else None
    manifests = _manifests(ctx.run_dir)
    fams: dict[str, str] = dict(old.families) if old else {}
    fams |= {n: m.family for n, m in manifests.items()} | dict(families or {})
    if not fams:
        raise ArtifactError(f"no checkpoints in {ctx.run_dir}: run `make quantize` first")
    try:
        ref = reference_of(fams)
    except ValueError as err:
        raise ArtifactError(f"{ctx.run_dir}: {err}") from None
    if ref not in manifests:
        raise ArtifactError(f"{ctx.run_dir}: the reference {ref} has no manifest yet: run `make quantize` first")
    names = reference_first([*(old.declared if old else []), *(declared or []), *manifests], ref)
    serving = dict(old.serving) if old else {}
    serving |= {n: ctx.serving(m).to_dict() for n, m in manifests.items()}
    rec = RunRecord(model=manifests[ref].model, reference=ref, declared=names, families=fams,  # type: ignore[arg-type]
                    target=ctx.target.to_dict(), serving=serving,
                    updated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    rec.write(path)
    return rec


def declared_k(ctx: RunContext) -> int:
    """How many variants the run declared (run.json), for the eval stage's stopping level."""
    path = ctx.run_dir / "run.json"
    if not path.is_file():
        return max(len(_manifests(ctx.run_dir)) - 1, 1)
    rec = RunRecord.read(path)
    return max(len([n for n in rec.declared if n != rec.reference]), 1)
