"""Calibration text -> tokenized `datasets.Dataset` for llmcompressor's oneshot.

Always real text, never random tokens: outlier channels (what AWQ/GPTQ/NVFP4 scales are fitted to)
only appear on natural language. Sources: offline stdlib docstrings (default), a hub dataset (as
llmcompressor's examples: ultrachat with the chat template), or a local .txt/.jsonl file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from qgcore import corpus
from qgcore.errors import ConfigError, DatasetAccessError, hub_download_error
from qgcore.hashing import bytes_key
from quantize.recipe import CalibrationSpec


def load_texts(spec: CalibrationSpec, tokenizer: Any = None) -> tuple[list[str], str]:
    """Return (texts, provenance id with content hash)."""
    if spec.source == "builtin":
        texts = corpus.sample("calibration", spec.num_samples, spec.seed)
        return texts, f"{corpus.CORPUS_ID}/calibration@{corpus.corpus_hash('calibration')}"
    if spec.source == "file":
        return _file_texts(spec)
    return _hub_texts(spec, tokenizer)


def _file_texts(spec: CalibrationSpec) -> tuple[list[str], str]:
    path = Path(str(spec.dataset)).expanduser()
    if not path.is_file():
        raise ConfigError(f"calibration file not found: {path} (use a .txt with blank-line paragraphs or .jsonl)")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            texts = [json.loads(line)[spec.text_field] for line in raw.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}: each line must be a JSON object with a '{spec.text_field}' field") from None
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if len(texts) < spec.num_samples:
        raise ConfigError(f"{path} has {len(texts)} samples, recipe asks for {spec.num_samples}: lower num_samples")
    texts = random.Random(spec.seed).sample(texts, spec.num_samples)
    return texts, f"file:{path.name}@{bytes_key(raw.encode())}"


def _hub_texts(spec: CalibrationSpec, tokenizer: Any) -> tuple[list[str], str]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(str(spec.dataset), split=spec.split)
    except DatasetNotFoundError as err:  # the hub answered: a typo (404) or a gated dataset
        if "gated" in str(err):
            raise DatasetAccessError(f"calibration dataset '{spec.dataset}' is gated on the Hugging Face Hub: "
                                     "request access and set HF_TOKEN, or use calibration.source: builtin") from None
        raise ConfigError(f"calibration dataset '{spec.dataset}' does not exist on the Hugging Face Hub (404): fix "
                          "calibration.dataset") from None
    except OSError as err:
        raise hub_download_error(err, f"calibration dataset '{spec.dataset}'",
                                 "use calibration.source: builtin or a local file") from None
    except ValueError as err:  # a split the dataset does not have
        raise ConfigError(f"calibration dataset '{spec.dataset}': {str(err).splitlines()[0]}: fix "
                          "calibration.split") from None
    ds = ds.shuffle(seed=spec.seed).select(range(min(spec.num_samples, len(ds))))
    texts = []
    for row in ds:
        if "messages" in row and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        else:
            texts.append(str(row[spec.text_field]))
    revision = getattr(ds, "_fingerprint", "unknown")
    return texts, f"hub:{spec.dataset}/{spec.split}@{revision}"


def fingerprint(spec: CalibrationSpec | None) -> str | None:
    """What the calibration text *is*, for the content key: a changed corpus or file means a new checkpoint."""
    if spec is None:
        return None
    if spec.source == "builtin":
        return f"{corpus.CORPUS_ID}@{corpus.corpus_hash('calibration')}"
    if spec.source == "file":
        path = Path(str(spec.dataset)).expanduser()
        return f"file@{bytes_key(path.read_bytes())}" if path.is_file() else f"file:{path}"
    return f"hub:{spec.dataset}/{spec.split}"  # the hub revision is recorded in the manifest after loading


def build_dataset(spec: CalibrationSpec, tokenizer: Any) -> tuple[Any, str]:
    from datasets import Dataset

    texts, provenance = load_texts(spec, tokenizer)
    ds = Dataset.from_dict({"text": texts})
    ds = ds.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=spec.seq_len, add_special_tokens=True),
        batched=True,
        remove_columns=["text"],
    )
    return ds, provenance
