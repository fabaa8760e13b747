"""Run lm-eval on one task against a served model (or transformers, for emulation/benchmarks) and turn
its output into TaskResult fields with per-item outcomes for paired comparison.

Log-likelihood tasks go through `local-completions` (prompt log-probs from vLLM, BOS added as the hf
backend does: without it scores drift by up to ~1.3 nats), with lm-eval's context limit set to the served
context and every left-truncated request counted. Generative tasks go through `local-chat-completions`
with the chat template; before any request is sent, each prompt plus its generation budget is checked
against the served context (vLLM would otherwise clamp the budget silently: vllm/entrypoints/serve/utils/
api_utils.py:188), and every response's finish_reason and token usage is recorded, so a task says how
many generations stopped on their own, hit the budget, or a recorded CPU cap.

A failure while lm-eval builds or scores the task is that task's (`TaskFailure`); a failure in parsing
lm-eval's output is a tool error (exit 1), never a score.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals import emulation
from qgcore.errors import ConfigError, ToolError, did_you_mean

log = logging.getLogger("quantgate.eval")
_PRIMARY = ("acc", "exact_match", "bits_per_byte", "acc_norm", "f1", "bleu")
_LN2 = math.log(2)
_LETTERS = "ABCDEFGHIJKLMNOP"
# requests in flight: vLLM batches them, so a GPU wants many; two CPU cores gain nothing past a few
CONCURRENCY = {("cpu", False): 4, ("cpu", True): 4, ("cuda", False): 32, ("cuda", True): 128}


class TaskFailure(Exception):
    """A task could not be scored (its requests errored, its data failed to load, it does not fit the
    served context): that task fails with this reason and code; the variant keeps its other tasks."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class TaskIndex:
    """lm-eval's task index, built only when something must be scored (its build walks ~14k YAMLs: 12 s)."""

    def __init__(self, include_paths: list[Path]):
        self.include_paths = include_paths
        self._tm: Any = None

    @property
    def tm(self) -> Any:
        if self._tm is None:
            from lm_eval.tasks import TaskManager

            self._tm = TaskManager(include_path=[str(p) for p in self.include_paths])
        return self._tm

    def check(self, tasks: list[str]) -> None:
        known = set(self.tm.all_tasks)
        for t in tasks:
            if t not in known:
                names = sorted(k for k in known if not k.startswith("_"))
                raise ConfigError(did_you_mean(t, names, "task") + " (lm-eval tasks, plus --include-path folders)")

    def config(self, task: str) -> dict[str, Any]:
        """A task's config from the index without loading data (a group is described by its first subtask)."""
        entry = self.tm.task_index[task]
        cfg = dict(entry.cfg or {})
        if "output_type" not in cfg and isinstance(cfg.get("task"), list) and cfg["task"]:
            first = cfg["task"][0]
            if isinstance(first, str) and first in self.tm.task_index:
                cfg = dict(self.tm.task_index[first].cfg or {})
        return cfg

    def items(self, task: str, limit: int | None) -> list[str]:
        """Every item id the task scores (doc ids as the samples name them), loading its data once."""
        loaded = self.tm.load([task])["tasks"]
        ids = []
        for sub in sorted(loaded):
            n = len(loaded[sub].eval_docs)
            n = min(n, limit) if limit is not None else n
            ids += [str(i) if sub == task else f"{sub}:{i}" for i in range(n)]
        return ids


def subset(task: str, ids: list[str]) -> dict[str, list[int]]:
    """lm-eval's `samples` argument for these item ids: per leaf task, sorted unique indices (sorted, or the
    logged doc_id points at the wrong document: lm_eval/evaluator.py:637)."""
    out: dict[str, set[int]] = {}
    for i in ids:
        sub, _, idx = i.rpartition(":")
        out.setdefault(sub or task, set()).add(int(idx))
    return {k: sorted(v) for k, v in out.items()}


@dataclass(frozen=True)
class Endpoint:
    """How to reach the scoring engine: a vLLM server, or transformers (emulation)."""

    base_url: str | None  # None: transformers
    served_name: str
    checkpoint: str  # also the tokenizer
    context: int  # the served max_model_len
    platform: str  # cpu | cuda
    gen_cap: int | None = None  # a recorded CPU-only cap on generated tokens, identical for every variant
    dtype: str = "bfloat16"  # transformers' compute dtype (emulation): qgcore.serving.compute_dtype


def _completions_class() -> Any:
    from lm_eval import utils
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class Completions(LocalCompletionsAPI):  # type: ignore[misc]
        """lm-eval's `local-completions`, except that (1) a rolling log-likelihood task (perplexity) sends the
        windows of *all* documents through one batched, concurrent call (lm-eval's own windows: identical
        scores), and (2) every request lm-eval left-truncates to the context is counted."""

        truncated = 0
        requests = 0

        def batch_loglikelihood_requests(self, chunks: Any) -> Any:
            chunks = [list(c) for c in chunks]
            for chunk in chunks:
                for _key, ctx, cont in chunk:
                    self.requests += 1
                    self.truncated += len(ctx) + len(cont) > self.max_length
            return super().batch_loglikelihood_requests(chunks)

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

    return Completions


def _chat_class() -> Any:
    from lm_eval.models.openai_completions import LocalChatCompletion

    class Chat(LocalChatCompletion):  # type: ignore[misc]
        """lm-eval's `local-chat-completions`, checking every prompt + budget against the served context
        before sending anything, and recording how each generation ended (finish_reason, usage)."""

        def __init__(self, *args: Any, quantgate_tokenizer: str, quantgate_context: int,
                     quantgate_gen_cap: int | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            from transformers import AutoTokenizer

            self.qg_tok = AutoTokenizer.from_pretrained(quantgate_tokenizer)
            self.qg_context = quantgate_context
            self.qg_cap = quantgate_gen_cap
            self.qg_stats: dict[str, Any] = {"requests": 0, "finish": {}, "completion_tokens": 0,
                                             "max_completion_tokens": 0, "max_prompt_tokens": 0, "budget": None,
                                             "task_budget": None}
            self.qg_lengths: list[int] = []

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            own = max(int(r.args[1].get("max_gen_toks", self._max_gen_toks)) for r in requests)
            budget = min(own, self.qg_cap) if self.qg_cap else own
            for r in requests:  # the recorded CPU cap, applied here so the task's own budget stays visible
                r.args[1]["max_gen_toks"] = min(int(r.args[1].get("max_gen_toks", self._max_gen_toks)), budget)
            self.qg_stats["task_budget"] = own
            if not getattr(self.qg_tok, "chat_template", None):  # vLLM refuses chat completions without one
                raise TaskFailure("failed:scoring", "the checkpoint's tokenizer has no chat template: generative "
                                  "(chat) tasks need one (vLLM serves /v1/chat/completions only with a template)")
            longest, over = 0, 0
            for r in requests:
                ids = self.qg_tok.apply_chat_template(json.loads(r.args[0].prompt), add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
                n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a mapping where return_dict wins
                longest = max(longest, n)
                over += n + budget > self.qg_context
            self.qg_stats |= {"budget": budget, "max_prompt_tokens": longest}
            if over:
                raise TaskFailure("failed:context",
                                  f"{over} of {len(requests)} prompts (up to {longest} tokens) plus the generation "
                                  f"budget {budget} exceed the served context {self.qg_context}: serve a longer "
                                  "context (--max-model-len, up to the model's own) or lower the budget")
            return super().generate_until(requests, disable_tqdm)

        def parse_generations(self, outputs: Any, **kwargs: Any) -> list[str]:
            for out in outputs if isinstance(outputs, list) else [outputs]:
                if not isinstance(out, dict):
                    continue
                usage = out.get("usage") or {}
                for ch in out.get("choices") or []:
                    reason = str(ch.get("finish_reason"))
                    self.qg_stats["requests"] += 1
                    self.qg_stats["finish"][reason] = self.qg_stats["finish"].get(reason, 0) + 1
                done = int(usage.get("completion_tokens") or 0)
                self.qg_lengths.append(done)
                self.qg_stats["completion_tokens"] += done
                self.qg_stats["max_completion_tokens"] = max(self.qg_stats["max_completion_tokens"], done)
                self.qg_stats["max_prompt_tokens"] = max(self.qg_stats["max_prompt_tokens"],
                                                         int(usage.get("prompt_tokens") or 0))
            return super().parse_generations(outputs, **kwargs)

    return Chat


def make_model(ep: Endpoint, generative: bool) -> tuple[Any, dict[str, Any]]:
    """The lm-eval model object (or name) and its args for one endpoint."""
    if ep.base_url is None:
        # lm-eval loads it inside run_task's simple_evaluate, under emulation.loading(ep.dtype)
        return "hf", {"pretrained": ep.checkpoint, "dtype": ep.dtype,
                      "device": "cuda" if ep.platform == "cuda" else "cpu", "batch_size": 8}
    concurrent = CONCURRENCY[(ep.platform, generative)]
    if generative:
        args = {"base_url": f"{ep.base_url}/chat/completions", "model": ep.served_name, "num_concurrent": concurrent,
                "max_retries": 2, "tokenizer_backend": None, "tokenized_requests": False, "timeout": 3600}
        return _chat_class()(**args, quantgate_tokenizer=ep.checkpoint, quantgate_context=ep.context,
                             quantgate_gen_cap=ep.gen_cap), args
    args = {"base_url": f"{ep.base_url}/completions", "model": ep.served_name, "tokenizer": ep.checkpoint,
            "tokenizer_backend": "huggingface", "add_bos_token": True, "num_concurrent": concurrent,
            "batch_size": 8 if ep.platform == "cpu" else 32, "max_retries": 2, "tokenized_requests": True,
            "max_length": ep.context, "timeout": 3600}
    return _completions_class()(**args), args


def run_task(*, task: str, tm: Any, endpoint: Endpoint, generative: bool, limit: int | None,
             items: dict[str, list[int]] | None, seed: int, samples_path: Path) -> dict[str, Any]:
    """One lm-eval `simple_evaluate` call (all of a task's items up to `limit`, or exactly `items`: per leaf
    task, sorted indices); returns the parsed TaskResult fields. Raises TaskFailure for the task's own
    failure, ToolError for a failure parsing what lm-eval returned."""
    import lm_eval

    started = time.perf_counter()
    model, args = make_model(endpoint, generative)
    # the server path caps inside the model (Chat.generate_until); transformers through lm-eval's gen_kwargs
    gen_kwargs = ({"max_gen_toks": endpoint.gen_cap} if generative and endpoint.gen_cap and endpoint.base_url is None
                  else None)
    loading = emulation.loading(endpoint.dtype) if endpoint.base_url is None else contextlib.nullcontext()
    try:
        with loading:  # lm-eval loads the transformers model inside simple_evaluate
            out = lm_eval.simple_evaluate(
                model=model, model_args=args if isinstance(model, str) else None, tasks=[task],
                limit=None if items else limit, samples=items, log_samples=True,
                task_manager=tm, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, bootstrap_iters=200, apply_chat_template=generative, verbosity="WARNING",
                gen_kwargs=gen_kwargs,
            )
    except TaskFailure:
        raise
    except Exception as err:  # lm-eval building or scoring this task: the task's failure, with the cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TaskFailure("failed:scoring", f"lm-eval failed on {task}: {type(err).__name__}: {first}") from err
    wall = time.perf_counter() - started
    try:
        if out is None:
            raise ValueError("lm-eval returned no results")
        samples = group_samples(task, out["samples"])
        fields = parse_results(task, out, samples)
    except Exception as err:
        raise ToolError(f"parsing lm-eval's output for {task} failed: {type(err).__name__}: {err} "
                        "(a quantgate bug: please report it with the run folder)") from err
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with samples_path.open("a" if items else "w") as fh:
        for s in samples:
            fh.write(json.dumps(s, default=str) + "\n")
    if generative and endpoint.base_url is not None:
        fields["generation"] = _generation_summary(model, out, task, endpoint)
    elif not generative and endpoint.base_url is not None:
        fields["prompts"] = {"requests": int(model.requests), "truncated": int(model.truncated),
                             "context": endpoint.context}
    return fields | {"wall_seconds": round(wall, 2)}


def _generation_summary(model: Any, out: dict, task: str, ep: Endpoint) -> dict[str, Any]:
    st = model.qg_stats
    budget = st["budget"]
    own = st.get("task_budget") or _task_budget(out, task)
    lengths = model.qg_lengths
    at_budget = sum(1 for n in lengths if budget and n >= budget)
    length_ended = st["finish"].get("length", 0)
    return {"requests": st["requests"], "finish_reasons": dict(st["finish"]), "budget": budget,
            "task_budget": own, "cap": ep.gen_cap if ep.gen_cap and own and ep.gen_cap < own else None,
            "hit_budget": at_budget, "cut_by_context": max(length_ended - at_budget, 0),
            "completion_tokens": st["completion_tokens"], "max_completion_tokens": st["max_completion_tokens"],
            "max_prompt_tokens": st["max_prompt_tokens"], "context": ep.context}


def _task_budget(out: dict, task: str) -> int | None:
    for name, cfg in (out.get("configs") or {}).items():
        if name == task or name.startswith(f"{task}_") or task in name:
            gk = cfg.get("generation_kwargs") or {}
            if "max_gen_toks" in gk:
                return int(gk["max_gen_toks"])
    return None


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
        raise ValueError(f"lm-eval gave no metric for {task}")
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
