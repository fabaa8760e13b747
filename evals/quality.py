"""Run lm-eval on one task against a served model (or transformers, for emulation/benchmarks) and turn
its output into a TaskResult with per-item outcomes for paired comparison.

Log-likelihood tasks go through `local-completions` (prompt log-probs from vLLM, BOS added as the hf
backend does: without it scores drift by up to ~1.3 nats); generative tasks through
`local-chat-completions` with the chat template.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigError, did_you_mean

log = logging.getLogger("quantgate.eval")
_PRIMARY = ("acc", "exact_match", "bits_per_byte", "acc_norm", "f1", "bleu")
_LN2 = math.log(2)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task data is local; a hub task is probed first


def task_manager(include_paths: list[Path]):  # noqa: ANN201
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths])


def check_tasks(tasks: list[str], tm) -> None:  # noqa: ANN001
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            names = sorted(k for k in known if not k.startswith("_"))
            raise ConfigError(did_you_mean(t, names, "task") + " (lm-eval tasks, plus --include-path folders)")


def output_type(task: str, tm) -> str:  # noqa: ANN001
    from lm_eval.tasks import get_task_dict

    obj = get_task_dict([task], tm)[task]
    return getattr(obj, "OUTPUT_TYPE", None) or obj.config.output_type


def model_args_for_server(base_url: str, served_name: str, tokenizer: str, generative: bool) -> tuple[str, dict]:
    if generative:
        return "local-chat-completions", {
            "base_url": f"{base_url}/chat/completions", "model": served_name, "num_concurrent": 4,
            "max_retries": 2, "tokenizer_backend": None, "tokenized_requests": False, "timeout": 600,
        }
    return "local-completions", {
        "base_url": f"{base_url}/completions", "model": served_name, "tokenizer": tokenizer,
        "tokenizer_backend": "huggingface", "add_bos_token": True, "num_concurrent": 4, "batch_size": 8,
        "max_retries": 2, "tokenized_requests": True, "max_length": 2048, "timeout": 600,
    }


def model_args_for_hf(checkpoint: str) -> tuple[str, dict]:
    # bfloat16 as vLLM serves it; compressed-tensors also decompresses NVFP4 only into the checkpoint dtype
    return "hf", {"pretrained": checkpoint, "dtype": "bfloat16", "device": "cpu", "batch_size": 8}


def run_task(*, task: str, tm, lm: str, model_args: dict, limit: int | None, seed: int,  # noqa: ANN001
             samples_path: Path, generative: bool) -> dict[str, Any]:
    """One lm-eval `simple_evaluate` call; returns the parsed TaskResult fields."""
    import lm_eval

    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=[task], limit=limit, log_samples=True, task_manager=tm,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=200, apply_chat_template=generative, verbosity="WARNING",
    )
    wall = time.perf_counter() - started
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    samples = out["samples"][task]
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with samples_path.open("w") as fh:
        for s in samples:
            fh.write(json.dumps(s, default=str) + "\n")
    return parse_results(task, out, samples) | {"wall_seconds": round(wall, 2)}


def parse_results(task: str, out: dict, samples: list[dict]) -> dict[str, Any]:
    res = out["results"][task]
    metrics = {k: v for k, v in res.items() if k != "alias" and isinstance(v, (int, float)) and "stderr" not in k}
    names = [k.split(",")[0] for k in metrics]
    primary = next((p for p in _PRIMARY if p in names), names[0] if names else None)
    if primary is None:
        raise RuntimeError(f"lm-eval gave no metric for {task}")
    key = next(k for k in metrics if k.split(",")[0] == primary)
    hib = bool(out.get("higher_is_better", {}).get(task, {}).get(primary, True))
    items: dict[str, list[float]] = {}
    binary = True
    for s in samples:
        v = s.get(primary)
        if isinstance(v, (list, tuple)) and len(v) == 2:  # (loglik, bytes) for bits_per_byte
            ll, n = float(v[0]), float(v[1])
            items[str(s["doc_id"])] = [-ll / _LN2, n]
            binary = False
        elif isinstance(v, (int, float)):
            items[str(s["doc_id"])] = [float(v), 1.0]
            binary = binary and float(v) in (0.0, 1.0)
    cfg = out.get("configs", {}).get(task, {})
    stderr = res.get(f"{primary}_stderr,{key.split(',', 1)[1]}")
    return {
        "metric": key, "higher_is_better": hib, "binary": binary and bool(items),
        "value": float(metrics[key]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        "metrics": metrics, "n_items": len(items), "items": items,
        "task_version": out.get("versions", {}).get(task),
        "num_fewshot": out.get("n-shot", {}).get(task, cfg.get("num_fewshot")),
    }
