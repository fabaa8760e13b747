"""CheckpointManifest: the one artifact the quantize stage writes and every later stage reads."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from quantgate.artifact import Artifact

MANIFEST_SCHEMA_VERSION = 1


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    path: str
    revision: str
    slug: str
    source: str


class CheckpointManifest(Artifact):
    producer: ClassVar[str] = "`make quantize`"
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    kind: Literal["checkpoint"] = "checkpoint"
    content_key: str  # hash of model revision + recipe hash + calibration + versions: a rerun with it skips
    model: ModelRef
    recipe: str
    recipe_hash: str
    recipe_spec: dict[str, Any]
    calibration: dict[str, Any] | None
    calibration_data: str | None  # provenance id with content hash
    versions: dict[str, str]
    device: dict[str, Any]
    wall_seconds: float
    peak_memory: dict[str, Any]  # {"rss_bytes": ..., "cuda_bytes": ...}, labelled by kind
    bytes_on_disk: int
    checkpoint_dir: str  # relative to the manifest's folder
    quantization: dict[str, Any]  # summary of config.json's quantization_config (None for bf16)
    serve: dict[str, Any]  # the recipe's serving spec, for the eval stage
    created_at: str
