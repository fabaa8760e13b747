"""Task suites: the built-in offline suite (built at run time from installed packages), lm-eval's own
tasks (e.g. `mmlu_pro`, which needs the dataset hub) and user task folders.

Nothing third-party is copied into the repo: the MMLU dev questions come from the prompt file inside
the installed lm-eval package, the perplexity text from the installed Python standard library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from quantgate import corpus
from quantgate.errors import ConfigError

BUILTIN_TASKS = ("qg_mmlu_dev", "qg_stdlib_ppl")
DEFAULT_TASKS = ("qg_mmlu_dev", "qg_stdlib_ppl", "mmlu_pro")
# lm-eval tasks whose data lives on the Hugging Face Hub: probed before use, skipped with a reason if unreachable.
HUB_DATASETS = {"mmlu_pro": "TIGER-Lab/MMLU-Pro", "leaderboard_mmlu_pro": "TIGER-Lab/MMLU-Pro"}
TASK_VERSION = 2
PPL_DOCS, PPL_MAX_CHARS = 200, 1500
_Q = re.compile(r"^Q: (.*?)\n\(A\) (.*?) \(B\) (.*?) \(C\) (.*?) \(D\) (.*?)\nA: .*?The answer is \(([ABCD])\)",
                re.DOTALL)


@dataclass(frozen=True)
class BuiltSuite:
    include_dir: Path  # folder passed to lm-eval's TaskManager(include_path=...)
    hashes: dict[str, str]  # task -> content hash of its data + config
    sources: dict[str, str]  # task -> where the items came from


def _lm_eval_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ConfigError("lm-eval is not installed in this environment: run `make setup`")
    return Path(spec.origin).parent


def mmlu_dev_items() -> list[dict]:
    """MMLU dev questions (with answers) parsed from lm-eval's flan CoT prompt file."""
    src = _lm_eval_dir() / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    prompts = json.loads(src.read_text())
    items = []
    for subject in sorted(prompts):
        for block in prompts[subject].split("\n\nQ: ")[1:]:
            m = _Q.match("Q: " + block)
            if m:
                q, *choices, ans = (g.strip() for g in m.groups())
                items.append({"subject": subject, "question": q, "choices": choices, "answer": "ABCD".index(ans)})
    return items


def stdlib_ppl_docs() -> list[dict]:
    docs = corpus.sample("heldout", PPL_DOCS, seed=1234)
    return [{"text": d[:PPL_MAX_CHARS]} for d in docs]


# Cloze form (the answer text is scored, not a letter), normalised by length: a 135M model answers "A" to
# every lettered question, which measures nothing; scoring the answers themselves separates variants.
_MMLU_YAML = {
    "task": "qg_mmlu_dev",
    "dataset_path": "json",
    "output_type": "multiple_choice",
    "test_split": "train",
    "doc_to_text": "The following is a question about {{subject.replace('_', ' ')}}.\n\n{{question}}\nAnswer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "answer",
    "target_delimiter": " ",
    "metric_list": [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": TASK_VERSION},
}
_PPL_YAML = {
    "task": "qg_stdlib_ppl",
    "dataset_path": "json",
    "output_type": "loglikelihood_rolling",
    "test_split": "train",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "should_decontaminate": False,
    "metric_list": [
        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
    ],
    "metadata": {"version": TASK_VERSION},
}


def build_builtin_suite(cache_root: Path) -> BuiltSuite:
    """Write the offline tasks' JSONL + YAML under a content-addressed folder and return it."""
    data = {"qg_mmlu_dev": mmlu_dev_items(), "qg_stdlib_ppl": stdlib_ppl_docs()}
    configs = {"qg_mmlu_dev": _MMLU_YAML, "qg_stdlib_ppl": _PPL_YAML}
    hashes = {}
    for task in BUILTIN_TASKS:
        blob = json.dumps([data[task], configs[task]], sort_keys=True).encode()
        hashes[task] = hashlib.sha256(blob).hexdigest()[:16]
    folder = cache_root / "tasks" / hashlib.sha256("".join(sorted(hashes.values())).encode()).hexdigest()[:12]
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for task in BUILTIN_TASKS:
            jsonl = folder / f"{task}.jsonl"
            jsonl.write_text("".join(json.dumps(row) + "\n" for row in data[task]))
            cfg = dict(configs[task], dataset_kwargs={"data_files": {"train": str(jsonl)}})
            (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (folder / "done").write_text("ok\n")
    sources = {"qg_mmlu_dev": "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json (MMLU dev, zero-shot cloze MC)",
               "qg_stdlib_ppl": f"{corpus.CORPUS_ID}/heldout@{corpus.corpus_hash('heldout')}"}
    return BuiltSuite(folder, hashes, sources)


def hub_skip_reason(task: str) -> str | None:
    """None if the task's hub dataset is reachable; else why it is skipped (never a substitute)."""
    repo = HUB_DATASETS.get(task)
    if repo is None:
        return None
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, timeout=10)
    except Exception as err:  # offline mode, DNS, refused, 404: all mean "cannot score it here"
        return f"dataset {repo} unreachable on the Hugging Face Hub ({type(err).__name__}); task not run"
    return None


def user_task_hash(include_path: Path | None, task: str) -> str:
    """Hash of the user's task YAMLs (and data files beside them) so edits invalidate cached scores."""
    if include_path is None:
        return "builtin-lm-eval"
    h = hashlib.sha256(task.encode())
    for f in sorted(include_path.rglob("*")):
        if f.is_file() and f.suffix in (".yaml", ".yml", ".json", ".jsonl", ".py", ".txt"):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
