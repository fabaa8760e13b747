"""Task suites: the built-in offline suite (built at run time from installed packages), lm-eval's own
tasks (e.g. `mmlu_pro`, which needs the dataset hub) and user task folders.

Nothing third-party is copied into the repo: the MMLU dev questions come from the prompt file inside
the installed lm-eval package, the perplexity text from the installed Python standard library.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from qgcore import corpus
from qgcore.errors import ConfigError, DatasetAccessError
from qgcore.hashing import content_key, file_sha256

BUILTIN_TASKS = ("qg_mmlu_dev", "qg_stdlib_cont", "qg_stdlib_ppl")
# mmlu_pro (generative CoT, what published numbers use) runs wherever its dataset is reachable or cached;
# elsewhere it is skipped with the reason, never substituted.
DEFAULT_TASKS = ("qg_mmlu_dev", "qg_stdlib_cont", "qg_stdlib_ppl", "mmlu_pro")
TASK_VERSION = 2
PPL_DOCS, PPL_MAX_CHARS = 200, 1500
CONT_ITEMS, CONT_CONTEXT, CONT_CHARS, CONT_CHOICES = 600, 240, 80, 4  # 600 items: in the gate's tested n
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


def stdlib_cont_items(n: int = CONT_ITEMS, seed: int = 4321) -> list[dict]:
    """Which continuation is the real one? Held-out stdlib docstrings: the first CONT_CONTEXT characters
    are the context, the next CONT_CHARS the answer, and the distractors are same-length passages from
    other documents. Any language model is well above chance (1/4) here, so the task can decide."""
    import random

    docs = [d for d in corpus.documents("heldout") if len(d) >= CONT_CONTEXT + CONT_CHARS]
    if len(docs) < n:
        raise ConfigError(f"qg_stdlib_cont needs {n} held-out documents, this Python's stdlib has {len(docs)}")
    rng = random.Random(seed)
    picked = rng.sample(docs, n)

    def cut(doc: str) -> int:  # a word boundary near CONT_CONTEXT, so every choice starts like a word
        at = doc.rfind(" ", 0, CONT_CONTEXT)
        return at if at > 0 else CONT_CONTEXT

    items = []
    for i, doc in enumerate(picked):
        context, answer = doc[:cut(doc)], doc[cut(doc):cut(doc) + CONT_CHARS].strip()
        others = rng.sample([d for d in picked if d is not doc], CONT_CHOICES - 1)
        choices = [o[cut(o):cut(o) + CONT_CHARS].strip() for o in others]
        gold = rng.randrange(CONT_CHOICES)
        choices.insert(gold, answer)
        items.append({"id": i, "question": " ".join(context.split()), "choices": [" ".join(c.split()) for c in choices],
                      "answer": gold})
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
_CONT_YAML = {
    "task": "qg_stdlib_cont",
    "dataset_path": "json",
    "output_type": "multiple_choice",
    "test_split": "train",
    "doc_to_text": "{{question}}",
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
    data = {"qg_mmlu_dev": mmlu_dev_items(), "qg_stdlib_cont": stdlib_cont_items(), "qg_stdlib_ppl": stdlib_ppl_docs()}
    configs = {"qg_mmlu_dev": _MMLU_YAML, "qg_stdlib_cont": _CONT_YAML, "qg_stdlib_ppl": _PPL_YAML}
    hashes = {task: content_key([data[task], configs[task]]) for task in BUILTIN_TASKS}
    folder = cache_root / "tasks" / content_key(sorted(hashes.values()))
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for task in BUILTIN_TASKS:
            jsonl = folder / f"{task}.jsonl"
            jsonl.write_text("".join(json.dumps(row) + "\n" for row in data[task]))
            cfg = dict(configs[task], dataset_kwargs={"data_files": {"train": str(jsonl)}})
            (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (folder / "done").write_text("ok\n")
    sources = {"qg_mmlu_dev": "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json (MMLU dev, zero-shot cloze MC)",
               "qg_stdlib_cont": f"{corpus.CORPUS_ID}/heldout@{corpus.corpus_hash('heldout')} (real vs other "
                                 "documents' continuations, 4-way cloze)",
               "qg_stdlib_ppl": f"{corpus.CORPUS_ID}/heldout@{corpus.corpus_hash('heldout')}"}
    return BuiltSuite(folder, hashes, sources)


@dataclass(frozen=True)
class TaskInfo:
    output_type: str
    dataset_path: str | None  # a hub id (org/name), a packaged loader (json, parquet), or None
    dataset_name: str | None


def task_info(task: str, tm) -> TaskInfo:  # noqa: ANN001 - lm_eval TaskManager
    """A task's output type and dataset from lm-eval's task index, without loading any data (a group is
    described by its first subtask)."""
    entry = tm.task_index[task]
    cfg = dict(entry.cfg or {})
    if "dataset_path" not in cfg and isinstance(cfg.get("task"), list) and cfg["task"]:
        first = cfg["task"][0]
        cfg = dict(tm.task_index[first].cfg or {}) if isinstance(first, str) and first in tm.task_index else cfg
    return TaskInfo(cfg.get("output_type", "multiple_choice"), cfg.get("dataset_path"), cfg.get("dataset_name"))


def is_hub_dataset(path: str | None) -> bool:
    return bool(path) and path.count("/") == 1 and not Path(path).exists() and not path.startswith((".", "/"))


def dataset_skip_reason(task: str, info: TaskInfo) -> str | None:
    """None when the task's hub dataset can be loaded (reachable, or already in the local Hugging Face
    cache, HF_HUB_OFFLINE=1 included); a reason when it is unreachable and not cached (the task is then
    skipped, never substituted). A dataset the hub says does not exist is a ConfigError (exit 3), a gated
    one a DatasetAccessError (exit 5): both name it."""
    if not is_hub_dataset(info.dataset_path):
        return None
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    repo = info.dataset_path
    try:
        datasets.load_dataset_builder(repo, info.dataset_name)
    except DatasetNotFoundError as err:
        if "gated" in str(err):
            raise DatasetAccessError(f"task {task}: dataset {repo} is gated on the Hugging Face Hub: request access "
                                     "on its page and set HF_TOKEN, or drop the task") from None
        raise ConfigError(f"task {task}: dataset {repo} does not exist on the Hugging Face Hub (404): fix the "
                          "task's dataset_path") from None
    except (ConnectionError, OSError) as err:
        return (f"dataset {repo} unreachable on the Hugging Face Hub and not in the local cache "
                f"(HF_HOME; {type(err).__name__}); task not run")
    return None


def user_task_hash(include_path: Path | None, task: str) -> str:
    """Hash of the user's task YAMLs (and data files beside them) so edits invalidate cached scores."""
    if include_path is None:
        return "builtin-lm-eval"
    files = {str(f.relative_to(include_path)): file_sha256(f) for f in sorted(include_path.rglob("*"))
             if f.is_file() and f.suffix in (".yaml", ".yml", ".json", ".jsonl", ".py", ".txt")}
    return content_key({"task": task, "files": files})
