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
import time
from pathlib import Path
from typing import Any

from evals import emulation
from qgcore.errors import ConfigError, did_you_mean

log = logging.getLogger("quantgate.eval")
_PRIMARY = ("acc", "exact_match", "bits_per_byte", "acc_norm", "f1", "bleu")
_LN2 = math.log(2)
_LETTERS = "ABCDEFGHIJKLMNOP"


def task_manager(include_paths: list[Path]):  # noqa: ANN201
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths])


def check_tasks(tasks: list[str], tm) -> None:  # noqa: ANN001
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            names = sorted(k for k in known if not k.startswith("_"))
            raise ConfigError(did_you_mean(t, names, "task") + " (lm-eval tasks, plus --include-path folders)")


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


def model_args_for_hf(checkpoint: str, *, cuda: bool = False) -> tuple[str, dict]:
    # bfloat16 as vLLM serves it; compressed-tensors also decompresses NVFP4 only into the checkpoint dtype
    return "hf", {"pretrained": checkpoint, "dtype": "bfloat16", "device": "cuda" if cuda else "cpu", "batch_size": 8}


def batched_rolling_completions(model_args: dict[str, Any]) -> Any:
    """lm-eval's `local-completions` client, except that a rolling log-likelihood task (perplexity) sends the
    windows of *all* documents through one batched, concurrent call instead of one document at a time.

    The windows are the ones lm-eval itself builds (utils.get_rolling_token_windows), and each document's
    log-likelihood is their sum, so scores are identical; only the request schedule changes (the server sees
    `batch_size` x `num_concurrent` requests in flight instead of one).
    """
    from lm_eval import utils
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class BatchedRolling(LocalCompletionsAPI):  # type: ignore[misc]
        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, (text,) in enumerate(req.args for req in requests):
                tokens = self.tok_encode(text)
                for w in utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length - 1, context_len=1):
                    windows.append((None, *utils.make_disjoint_window(w)))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (ll, _greedy) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm),
                                        strict=True):
                totals[i] += ll
            return totals

    return BatchedRolling(**model_args)


def run_task(*, task: str, tm, lm: str, model_args: dict, limit: int | None, seed: int,  # noqa: ANN001
             samples_path: Path, generative: bool) -> dict[str, Any]:
    """One lm-eval `simple_evaluate` call; returns the parsed TaskResult fields."""
    import lm_eval

    started = time.perf_counter()
    if lm == "hf":
        emulation.install()
    model: Any = batched_rolling_completions(model_args) if lm == "local-completions" else lm
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], limit=limit, log_samples=True, task_manager=tm,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=200, apply_chat_template=generative, verbosity="WARNING",
    )
    wall = time.perf_counter() - started
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    samples = group_samples(task, out["samples"])
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with samples_path.open("w") as fh:
        for s in samples:
            fh.write(json.dumps(s, default=str) + "\n")
    return parse_results(task, out, samples) | {"wall_seconds": round(wall, 2)}


def group_samples(task: str, by_task: dict[str, list[dict]]) -> list[dict]:
    """A task's samples; for a group (mmlu_pro is 14 subjects) every subtask's, ids made unique by subtask."""
    if task in by_task:
        return by_task[task]
    return [s | {"doc_id": f"{sub}:{s['doc_id']}"} for sub in sorted(by_task) for s in by_task[sub]]


def parse_results(task: str, out: dict, samples: list[dict]) -> dict[str, Any]:
    res = out["results"][task]
    metrics = {k: v for k, v in res.items() if k != "alias" and isinstance(v, (int, float)) and "stderr" not in k}
    names = [k.split(",")[0] for k in metrics]
    primary = next((p for p in _PRIMARY if p in names), names[0] if names else None)
    if primary is None:
        raise RuntimeError(f"lm-eval gave no metric for {task}")
    key = _primary_key(metrics, primary)
    filt = key.split(",", 1)[1] if "," in key else None
    # lm-eval logs one sample per (document, filter): keep only the scored filter's, or items would mix filters
    samples = [s for s in samples if filt is None or s.get("filter", filt) == filt]
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
    chance, examples = _choices(samples, primary, cfg)
    return {
        "metric": key, "higher_is_better": hib, "binary": binary and bool(items),
        "value": float(metrics[key]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        "metrics": metrics, "n_items": len(items), "items": items,
        "task_version": out.get("versions", {}).get(task),
        "num_fewshot": out.get("n-shot", {}).get(task, cfg.get("num_fewshot")),
        "chance": chance, "examples": examples,
    }


# With several filters (gsm8k: strict-match / flexible-extract), the strict one is what is reported as the score.
_FILTER_PREFERENCE = ("none", "strict-match", "custom-extract")


def _primary_key(metrics: dict[str, Any], primary: str) -> str:
    keys = [k for k in metrics if k.split(",")[0] == primary]
    for filt in _FILTER_PREFERENCE:
        if f"{primary},{filt}" in keys:
            return f"{primary},{filt}"
    return sorted(keys)[0]  # deterministic, whatever order lm-eval wrote them in


def _choices(samples: list[dict], primary: str, cfg: dict) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """Chance rate and, per item, the choice under the scored metric with the top-two margin.

    Multiple choice: the argmax of the log-likelihoods, normalised by the choice's length in characters
    where the metric is acc_norm (as lm-eval scores it). Generative tasks with listed options (MMLU-Pro):
    chance is 1/options and the choice is the extracted answer. Perplexity tasks: (None, {}).
    """
    delim = cfg.get("target_delimiter", " ")
    rates, examples = [], {}
    for s in samples:
        doc = s.get("doc") or {}
        question = str(doc.get("question", doc.get("query", "")))[:240]
        resps = s.get("filtered_resps") or []
        args = s.get("arguments") or []
        lls = []
        for r in resps:
            head = r[0] if isinstance(r, (list, tuple)) else r
            if isinstance(head, (int, float)) and not isinstance(head, bool):
                lls.append(float(head))
        if lls and len(lls) == len(resps) and len(lls) > 1:
            scores = lls
            if primary == "acc_norm" and len(args) == len(lls):
                lens = [max(len(_continuation(a)[len(delim):] if _continuation(a).startswith(delim)
                                else _continuation(a)), 1) for a in args]
                scores = [ll / n for ll, n in zip(lls, lens, strict=True)]
            order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
            rates.append(1 / len(scores))
            target = s.get("target")
            examples[str(s["doc_id"])] = {
                "question": question, "target": _LETTERS[target] if isinstance(target, int) and target < 16 else target,
                "choice": _LETTERS[order[0]] if order[0] < 16 else order[0],
                "margin": round(scores[order[0]] - scores[order[1]], 6),
            }
            continue
        options = doc.get("options") or doc.get("choices")
        if isinstance(options, list) and options:
            rates.append(1 / len(options))
            resp = resps[0] if resps else None
            examples[str(s["doc_id"])] = {"question": question, "target": doc.get("answer", s.get("target")),
                                          "choice": resp if isinstance(resp, str) else None, "margin": None}
    chance = sum(rates) / len(rates) if rates and len(rates) == len(samples) else None
    return chance, examples


def _continuation(arg: Any) -> str:
    """An lm-eval request argument (context, continuation) as saved in samples: the continuation text."""
    if isinstance(arg, (list, tuple)) and len(arg) >= 2:
        return str(arg[1])
    if isinstance(arg, dict):
        return str(arg.get("arg_1", ""))
    return ""
