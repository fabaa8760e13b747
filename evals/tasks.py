"""Task suites: the built-in offline tasks (a registry: each built at run time from installed packages),
lm-eval's own tasks (e.g. `mmlu_pro`, which needs the dataset hub or its local cache) and user task folders.

Nothing third-party is copied into the repo: the MMLU dev questions come from the prompt file inside
the installed lm-eval package, the continuation and perplexity text from the installed Python standard
library. Adding a built-in task is one `@builtin(...)` function here (and its test).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import random
import re
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qgcore import corpus
from qgcore.errors import ConfigError, DatasetAccessError
from qgcore.hashing import content_key, file_sha256

TASK_VERSION = 2
# mmlu_pro (generative CoT, what published numbers use) runs wherever its dataset is reachable or cached;
# elsewhere it is skipped with the reason, never substituted.
HUB_DEFAULTS = ("mmlu_pro",)
_Q = re.compile(r"^Q: (.*?)\n\(A\) (.*?) \(B\) (.*?) \(C\) (.*?) \(D\) (.*?)\nA: .*?The answer is \(([ABCD])\)",
                re.DOTALL)


@dataclass(frozen=True)
class BuiltinTask:
    """A task built at run time from installed packages: its rows, its lm-eval config, where they came from."""

    name: str
    rows: Callable[[], list[dict]]
    config: dict[str, Any]
    source: Callable[[], str]
    demo_limit: int | None = None  # in the demo suite with this many items (None: not in the demo)


BUILTINS: dict[str, BuiltinTask] = {}


def builtin(name: str, *, config: dict[str, Any], source: Callable[[], str],
            demo_limit: int | None = None) -> Callable[[Callable[[], list[dict]]], Callable[[], list[dict]]]:
    """Register a built-in task: adding one is this decorator on a function that returns its rows."""
    def register(rows: Callable[[], list[dict]]) -> Callable[[], list[dict]]:
        BUILTINS[name] = BuiltinTask(name, rows, dict(config, task=name), source, demo_limit)
        return rows
    return register


def default_tasks() -> list[str]:
    return [*BUILTINS, *HUB_DEFAULTS]


def demo_tasks() -> dict[str, int | None]:
    """The demo's tasks and per-task item counts (hub tasks take the demo's default limit)."""
    return {t.name: t.demo_limit for t in BUILTINS.values() if t.demo_limit is not None} | dict.fromkeys(HUB_DEFAULTS)


def _lm_eval_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ConfigError("lm-eval is not installed in this environment: run `make setup`")
    return Path(spec.origin).parent


def _heldout() -> str:
    return f"{corpus.CORPUS_ID}/heldout@{corpus.corpus_hash('heldout')}"


_MC = {"dataset_path": "json", "output_type": "multiple_choice", "test_split": "train", "doc_to_choice": "{{choices}}",
       "doc_to_target": "answer", "target_delimiter": " ",
       "metric_list": [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
       "metadata": {"version": TASK_VERSION}}


# Cloze form (the answer text is scored, not a letter), normalised by length: a 135M model answers "A" to
# every lettered question, which measures nothing; scoring the answers themselves separates variants.
_MMLU_PROMPT = "The following is a question about {{subject.replace('_', ' ')}}.\n\n{{question}}\nAnswer:"


@builtin("qg_mmlu_dev", config=_MC | {"doc_to_text": _MMLU_PROMPT},
         source=lambda: "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json (MMLU dev, zero-shot cloze MC)")
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


CONT_ITEMS, CONT_CONTEXT, CONT_CHARS, CONT_CHOICES = 600, 240, 80, 4  # 600 items: in the gate's tested n


@builtin("qg_stdlib_cont", demo_limit=100, config=_MC | {"doc_to_text": "{{question}}"},
         source=lambda: f"{_heldout()} (real vs other documents' continuations, 4-way cloze)")
def stdlib_cont_items(n: int = CONT_ITEMS, seed: int = 4321) -> list[dict]:
    """Which continuation is the real one? Held-out stdlib docstrings: the first CONT_CONTEXT characters
    are the context, the next CONT_CHARS the answer, and the distractors are same-length passages from
    other documents. Any language model is well above chance (1/4) here, so the task can decide."""
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


PPL_DOCS, PPL_MAX_CHARS = 600, 500  # 600: the gate's minimum for bits/byte (README "The gate"); ~200k chars


@builtin("qg_stdlib_ppl", demo_limit=PPL_DOCS, source=_heldout, config={
    "dataset_path": "json", "output_type": "loglikelihood_rolling", "test_split": "train", "doc_to_text": "",
    "doc_to_target": "{{text}}", "should_decontaminate": False,
    "metric_list": [
        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
    ],
    "metadata": {"version": TASK_VERSION}})
def stdlib_ppl_docs() -> list[dict]:
    """Perplexity (bits per byte) on held-out standard-library docstrings."""
    return [{"text": d[:PPL_MAX_CHARS]} for d in corpus.sample("heldout", PPL_DOCS, seed=1234)]


@dataclass(frozen=True)
class BuiltSuite:
    include_dir: Path  # folder passed to lm-eval's TaskManager(include_path=...)
    hashes: dict[str, str]  # task -> content hash of its data + config
    sources: dict[str, str]  # task -> where the items came from


def _inputs_key() -> str:
    """Everything the built-in rows are made from: this file, lm-eval's version and this Python's stdlib.
    Equal inputs build equal rows, so a rerun reads the index instead of re-parsing the stdlib."""
    return content_key([file_sha256(Path(__file__)), file_sha256(Path(corpus.__file__)),
                        importlib.metadata.version("lm_eval"), sys.version,
                        sysconfig.get_paths()["stdlib"]])


def build_builtin_suite(cache_root: Path) -> BuiltSuite:
    """Write the offline tasks' JSONL + YAML under a content-addressed folder and return it."""
    index = cache_root / "tasks" / f"inputs-{_inputs_key()}.json"
    if index.is_file():
        known = json.loads(index.read_text())
        folder = Path(known["folder"])
        if (folder / "done").is_file():
            return BuiltSuite(folder, known["hashes"], known["sources"])
    data = {name: t.rows() for name, t in BUILTINS.items()}
    hashes = {name: content_key([data[name], t.config]) for name, t in BUILTINS.items()}
    folder = cache_root / "tasks" / content_key(sorted(hashes.values()))
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name, t in BUILTINS.items():
            jsonl = folder / f"{name}.jsonl"
            jsonl.write_text("".join(json.dumps(row) + "\n" for row in data[name]))
            cfg = dict(t.config, dataset_kwargs={"data_files": {"train": str(jsonl)}})
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (folder / "done").write_text("ok\n")
    sources = {name: t.source() for name, t in BUILTINS.items()}
    index.write_text(json.dumps({"folder": str(folder), "hashes": hashes, "sources": sources}) + "\n")
    return BuiltSuite(folder, hashes, sources)


@dataclass(frozen=True)
class TaskInfo:
    output_type: str
    dataset_path: str | None  # a hub id (org/name), a packaged loader (json, parquet), or None
    dataset_name: str | None

    @property
    def generative(self) -> bool:
        return self.output_type == "generate_until"


def task_info(cfg: dict[str, Any]) -> TaskInfo:
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
    """Hash of the user's task YAMLs (and data files beside them) so edits invalidate cached scores; for
    lm-eval's own tasks, lm-eval's version is in every key."""
    if include_path is None:
        return "builtin-lm-eval"
    files = {str(f.relative_to(include_path)): file_sha256(f) for f in sorted(include_path.rglob("*"))
             if f.is_file() and f.suffix in (".yaml", ".yml", ".json", ".jsonl", ".py", ".txt")}
    return content_key({"task": task, "files": files})
