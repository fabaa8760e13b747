"""Artifacts for unit tests, built with the project's own classes: a variant folder whose CheckpointManifest
file records match its (one-file) checkpoint folder, over the shapes of tests/conftest.py's tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qgcore.artifacts import CheckpointManifest, ModelRef
from qgcore.device import Platform
from qgcore.integrity import record_files
from quantize.recipe import load_recipe

# tests/conftest.py's tiny Llama, as model_config_summary reads it (the architecture serving depends on)
TINY_ARCH = {"max_position_embeddings": 2048, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 128,
             "num_hidden_layers": 2, "head_dim": 64, "intermediate_size": 256, "vocab_size": 512}
TINY_SHAPES = {"q_proj": [128, 128], "k_proj": [128, 64], "v_proj": [128, 64], "o_proj": [128, 128],
               "gate_proj": [128, 256], "up_proj": [128, 256], "down_proj": [256, 128], "lm_head": [128, 512]}
H100 = Platform("cuda", "H100", 9.0, 8, 80 * 2**30, source="test")


def write_manifest(run_dir: Path, name: str, *, bytes_on_disk: int = 1 << 20, wall_seconds: float = 1.0,
                   arch: dict[str, Any] | None = None, device: dict[str, Any] | None = None) -> CheckpointManifest:
    """`run_dir/<name>/manifest.json` for the shipped recipe `name`, over a one-file checkpoint folder."""
    recipe = load_recipe(name)
    arch = dict(TINY_ARCH if arch is None else arch)
    ckpt = run_dir / name / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", **arch}))
    manifest = CheckpointManifest(
        content_key=f"k-{name}", model=ModelRef(model_id="tiny", path="/m", revision="sha256:0", slug="tiny",
                                                source="local"),
        recipe=name, family=recipe.family, recipe_hash=recipe.content_hash(),
        recipe_spec=recipe.model_dump(mode="json"), calibration=None, calibration_data=None, versions={},
        device=device or {"device": "cpu"}, wall_seconds=wall_seconds, peak_memory={"rss_bytes": 1},
        bytes_on_disk=bytes_on_disk, checkpoint_dir="checkpoint", files=record_files(ckpt),
        quantization={"quantized": recipe.quant.scheme != "none"}, linear_shapes=TINY_SHAPES, architecture=arch,
        serve=recipe.serve.model_dump(mode="json"), created_at="2026-01-01T00:00:00+00:00")
    manifest.write(run_dir / name / "manifest.json")
    return manifest
