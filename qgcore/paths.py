"""Where things live: the project root, the cache, and the runs/<slug>/ folder name of a model.

One home for the slug, so every stage (and the Makefile) finds the same run folder for MODEL=...
without loading or downloading anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("QUANTGATE_CACHE", PROJECT_ROOT / ".cache"))
DEFAULT_MODEL = "default"
DEFAULT_SLUG = "smollm2-135m-instruct"  # the embedded default model's run folder


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower().replace("/", "--")).strip("-") or "model"


def slug_for(spec: str | None) -> str:
    """The runs/ folder name for MODEL=..., without loading or downloading anything."""
    if not spec or spec == DEFAULT_MODEL:
        return DEFAULT_SLUG
    local = Path(spec).expanduser()
    return slugify(local.name) if local.exists() else slugify(spec)
