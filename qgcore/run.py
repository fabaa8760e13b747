"""The run context: resolved once by the CLI (quantgate.context) and handed to every stage.

It holds what used to be re-derived in each stage or passed through environment variables: the run
folder, the platform servers run on, the target a verdict is scoped to, the serving venv, the cache,
executor settings (threads per Ray cell), and the run's serving overrides (tensor parallel, a context
cap). Stages read nothing of each other's environment; a Ray cell gets the same object, pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qgcore.artifacts import CheckpointManifest
from qgcore.device import Platform
from qgcore.serving import Purpose, ServeConfig, VariantServing, config_for, plan_serving

Executor = Literal["local", "ray"]


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    model: str | None  # what the user asked for (MODEL=); None is the embedded default
    platform: Platform  # where servers run (this machine, or the Ray cluster's GPU nodes)
    target: Platform  # what the verdict is for: TARGET_GPU, else the platform itself
    cache_dir: Path
    serve_python: str  # the serving venv's interpreter
    executor: Executor = "local"
    cpu_threads: int | None = None  # CPU-only Ray cells: threads per cell (its CPU request)
    tensor_parallel: dict[str, int] = field(default_factory=dict)  # variant (or "*") -> TP override
    max_model_len: int | None = None  # a cap on the served context (memory); None: the model's own
    startup_timeout_s: float | None = None  # None: scaled with checkpoint bytes (evals.serve)
    # the user's number-moving environment (OMP_*, VLLM_*, ...) as it was when the command started: every
    # server of the run gets exactly this, on any node (qgcore.serving.server_environment)
    pinned_env: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return self.run_dir.name

    def tp_override(self, variant: str) -> int | None:
        return self.tensor_parallel.get(variant, self.tensor_parallel.get("*"))

    def serving(self, manifest: CheckpointManifest) -> VariantServing:
        return plan_serving(weight_bytes=manifest.bytes_on_disk, model=manifest.architecture, on=self.platform,
                            tp_override=self.tp_override(manifest.recipe), max_model_len_cap=self.max_model_len)

    def serve_config(self, manifest: CheckpointManifest, purpose: Purpose,
                     max_num_seqs: int | None = None) -> ServeConfig:
        threads = self.cpu_threads if self.platform.kind == "cpu" and purpose == "score" else None
        return config_for(manifest.serve, self.serving(manifest), self.platform, purpose=purpose,
                          cpu_threads=threads, max_num_seqs=max_num_seqs)
