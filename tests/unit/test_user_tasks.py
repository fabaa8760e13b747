"""Task suites: user task folders (--include-path) beside the built-in offline tasks in one lm-eval index
(evals.quality.TaskIndex, built lazily), the built-in registry and its cached suite (evals.tasks), item ids for
group-sequential looks (subset), and run_task's split between a task's failure and a tool error.

lm-eval's TaskManager walks ~14k YAMLs (about 12 s): it is built once for this module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from evals import quality, tasks
from evals.quality import Endpoint, TaskFailure, TaskIndex, run_task, subset
from evals.tasks import (
    BUILTINS,
    HUB_DEFAULTS,
    build_builtin_suite,
    builtin,
    default_tasks,
    demo_tasks,
    task_info,
    user_task_hash,
)
from qgcore.errors import EXIT_CONFIG, ConfigError, ToolError

TASK = """task: NAME
dataset_path: json
dataset_kwargs:
  data_files: {train: DATA}
test_split: train
output_type: multiple_choice
doc_to_text: "{{q}} Answer:"
doc_to_choice: ["no", "yes"]
doc_to_target: "{{a}}"
metric_list:
  - metric: acc
metadata: {version: 1}
"""
GROUP = """group: my_checks
task: [my_yes_no, my_no_yes]
aggregate_metric_list:
  - metric: acc
metadata: {version: 1}
"""
ROWS = [{"q": "Is water wet?", "a": 1}, {"q": "Is fire cold?", "a": 0}, {"q": "Is ice cold?", "a": 1}]


def write_user_tasks(d: Path) -> Path:
    """A user's folder as --include-path takes it: two task YAMLs over one JSONL, and a group of both."""
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name in ("my_yes_no", "my_no_yes"):
        (d / f"{name}.yaml").write_text(TASK.replace("NAME", name).replace("DATA", str(data)))
    (d / "my_checks.yaml").write_text(GROUP)
    return d


def _tiny_rows() -> list[dict]:
    _tiny_rows.calls += 1
    return [{"question": "2 + 2 =", "choices": ["4", "5"], "answer": 0}]


_tiny_rows.calls = 0


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory):
    """The built-in registry replaced by one tiny task (the real rows parse the stdlib), written by the suite
    builder itself: the folder lm-eval is pointed at, as the eval stage does."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "BUILTINS", {})
        builtin("qg_tiny", config=tasks._MC | {"doc_to_text": "{{question}}"}, source=lambda: "two sums",
                demo_limit=1)(_tiny_rows)
        return build_builtin_suite(tmp_path_factory.mktemp("cache"))  # the real registry is back for the rest


@pytest.fixture(scope="module")
def index(suite, tmp_path_factory: pytest.TempPathFactory) -> TaskIndex:
    """What evals.stage builds for `--include-path DIR`: the built-in suite's folder, then the user's."""
    ix = TaskIndex([suite.include_dir, write_user_tasks(tmp_path_factory.mktemp("user"))])
    ix.check(["qg_tiny"])  # builds lm-eval's index (once for the module)
    return ix


# ---- the index --------------------------------------------------------------------------------------------

def test_the_index_is_built_only_when_first_needed_and_once(monkeypatch, tmp_path: Path):
    import lm_eval.tasks

    built = []

    class FakeManager:
        def __init__(self, include_path):
            built.append(include_path)
            self.all_tasks = ["known"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    ix = TaskIndex([tmp_path / "a", tmp_path / "b"])
    assert built == []  # constructing it (every stage does) costs nothing
    ix.check(["known"])
    ix.check(["known"])
    assert built == [[str(tmp_path / "a"), str(tmp_path / "b")]] and ix.tm is ix.tm


def test_a_user_task_from_the_include_path_is_found_beside_the_builtin_ones(index: TaskIndex):
    index.check(["my_yes_no", "my_no_yes", "my_checks", "qg_tiny"])
    cfg = index.config("my_yes_no")
    info = task_info(cfg)
    assert (info.output_type, info.dataset_path, info.generative) == ("multiple_choice", "json", False)
    assert cfg["doc_to_choice"] == ["no", "yes"]
    assert task_info(index.config("qg_tiny")).output_type == "multiple_choice"


def test_a_group_is_described_by_its_first_subtask(index: TaskIndex):
    assert index.config("my_checks") == index.config("my_yes_no")


@pytest.mark.parametrize(("asked", "suggested"), [("my_yes_nope", "my_yes_no"), ("qg_tinny", "qg_tiny")])
def test_an_unknown_task_is_a_config_error_with_a_suggestion(index: TaskIndex, asked: str, suggested: str):
    with pytest.raises(ConfigError, match=rf"Unknown task '{asked}'\. Did you mean: [^?]*\b{suggested}\b") as err:
        index.check(["my_yes_no", asked])
    assert err.value.exit_code == EXIT_CONFIG and "--include-path" in str(err.value)


def test_items_are_the_doc_ids_the_samples_will_name(index: TaskIndex):
    assert index.items("my_yes_no", None) == ["0", "1", "2"]
    assert index.items("my_yes_no", 2) == ["0", "1"]
    group = index.items("my_checks", None)  # a group's ids name their subtask, as group_samples does
    assert sorted(group) == sorted(f"{t}:{i}" for t in ("my_no_yes", "my_yes_no") for i in range(3))
    assert index.items("qg_tiny", None) == ["0"]


def test_subset_maps_ids_back_to_sorted_unique_indices_per_leaf_task(index: TaskIndex):
    assert subset("t", ["3", "1", "3", "0"]) == {"t": [0, 1, 3]}
    assert subset("g", ["b:2", "a:1", "b:0", "a:1"]) == {"a": [1], "b": [0, 2]}
    ids = index.items("my_checks", None)
    look = ids[::2]  # some look of a seeded order
    got = subset("my_checks", look)
    assert sum(len(v) for v in got.values()) == len(set(look))
    assert {f"{t}:{i}" for t, idx in got.items() for i in idx} == set(look)


# ---- the built-in registry and its cached suite -------------------------------------------------------------

def test_the_builtin_registry_names_the_default_and_demo_suites():
    assert default_tasks() == [*BUILTINS, *HUB_DEFAULTS]
    demo = demo_tasks()
    assert {t: n for t, n in demo.items() if t in BUILTINS} == \
        {t.name: t.demo_limit for t in BUILTINS.values() if t.demo_limit is not None}
    assert all(demo[t] is None for t in HUB_DEFAULTS)  # hub tasks take the demo's default limit
    assert set(demo) <= set(default_tasks())
    for t in BUILTINS.values():
        assert t.config["task"] == t.name and t.config["dataset_path"] == "json"


def test_registering_a_builtin_adds_it_to_both_suites(monkeypatch):
    monkeypatch.setattr(tasks, "BUILTINS", dict(BUILTINS))
    builtin("qg_extra", config={"output_type": "multiple_choice"}, source=lambda: "x", demo_limit=7)(_tiny_rows)
    builtin("qg_full_only", config={"output_type": "multiple_choice"}, source=lambda: "x")(_tiny_rows)
    assert default_tasks()[-len(HUB_DEFAULTS) - 2:-len(HUB_DEFAULTS)] == ["qg_extra", "qg_full_only"]
    assert demo_tasks()["qg_extra"] == 7 and "qg_full_only" not in demo_tasks()
    assert tasks.BUILTINS["qg_extra"].config["task"] == "qg_extra"  # the config is named by the registry


def test_the_suite_is_written_once_and_then_read_from_its_index(suite, tmp_path: Path, monkeypatch):
    folder = suite.include_dir
    assert sorted(p.name for p in folder.iterdir()) == ["done", "qg_tiny.jsonl", "qg_tiny.yaml"]
    cfg = yaml.safe_load((folder / "qg_tiny.yaml").read_text())
    assert cfg["task"] == "qg_tiny" and cfg["dataset_kwargs"]["data_files"]["train"] == str(folder / "qg_tiny.jsonl")
    assert suite.sources == {"qg_tiny": "two sums"} and set(suite.hashes) == {"qg_tiny"}

    monkeypatch.setattr(tasks, "BUILTINS", {})
    builtin("qg_tiny", config=tasks._MC | {"doc_to_text": "{{question}}"}, source=lambda: "two sums")(_tiny_rows)
    cache = tmp_path / "cache"
    calls = _tiny_rows.calls
    first = build_builtin_suite(cache)
    assert _tiny_rows.calls == calls + 1
    assert build_builtin_suite(cache) == first and _tiny_rows.calls == calls + 1  # the index answered
    assert first.hashes == suite.hashes  # equal rows and config, equal content key (and folder name)
    assert first.include_dir.name == folder.name
    (first.include_dir / "done").unlink()  # a half-written folder is never trusted
    assert build_builtin_suite(cache) == first and _tiny_rows.calls == calls + 2


def test_user_task_hash_follows_the_folder_and_lm_evals_own_tasks_need_none(tmp_path: Path):
    d = write_user_tasks(tmp_path / "tasks")
    before = user_task_hash(d, "my_yes_no")
    assert user_task_hash(d, "my_yes_no") == before and user_task_hash(d, "my_no_yes") != before
    (d / "notes.md").write_text("not a task file")
    assert user_task_hash(d, "my_yes_no") == before
    (d / "data.jsonl").write_text('{"q": "Is ice cold?", "a": 1}\n')
    assert user_task_hash(d, "my_yes_no") != before
    copy = tmp_path / "elsewhere"
    shutil.copytree(d, copy)
    assert user_task_hash(copy, "my_yes_no") == user_task_hash(d, "my_yes_no")  # relative paths: movable
    assert user_task_hash(None, "mmlu_pro") == "builtin-lm-eval"


# ---- run_task: a task's failure vs a tool error ----------------------------------------------------------------

ENDPOINT = Endpoint(base_url=None, served_name="v", checkpoint="/ckpt", context=2048, platform="cpu")


def _out(task: str, ids: list[int]) -> dict:
    samples = [{"doc_id": i, "acc": float(i % 2), "filter": "none", "target": 1, "doc": {"question": f"q{i}"},
                "arguments": [["q", " no"], ["q", " yes"]], "filtered_resps": [[-1.0, False], [-0.5 - i, False]]}
               for i in ids]
    return {"results": {task: {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.1}},
            "samples": {task: samples}, "higher_is_better": {task: {"acc": True}}, "configs": {task: {}},
            "versions": {task: 1}, "n-shot": {task: 0}}


@pytest.fixture
def evaluate(monkeypatch):
    """lm-eval's simple_evaluate replaced by a scripted one (no model): records what it was asked."""
    import lm_eval

    calls: list[dict] = []
    script: list = []

    def fake(**kwargs):
        calls.append(kwargs)
        step = script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake, raising=False)
    monkeypatch.setattr(quality, "make_model", lambda ep, generative: ("hf", {"pretrained": ep.checkpoint}))
    return script, calls


def test_run_task_parses_items_and_appends_a_later_look_to_the_samples(evaluate, tmp_path: Path):
    script, calls = evaluate
    samples = tmp_path / "samples" / "t.jsonl"
    script += [_out("t", [0, 1]), _out("t", [2, 3])]
    first = run_task(task="t", tm=None, endpoint=ENDPOINT, generative=False, limit=100, items=None, seed=1,
                     samples_path=samples)
    assert (first["n_items"], first["items"], first["binary"]) == (2, {"0": [0.0, 1.0], "1": [1.0, 1.0]}, True)
    assert calls[0]["limit"] == 100 and calls[0]["samples"] is None and calls[0]["tasks"] == ["t"]
    nxt = run_task(task="t", tm=None, endpoint=ENDPOINT, generative=False, limit=100, items={"t": [2, 3]}, seed=1,
                   samples_path=samples)
    assert calls[1]["limit"] is None and calls[1]["samples"] == {"t": [2, 3]}  # exactly the look's items
    assert set(nxt["items"]) == {"2", "3"}
    assert [json.loads(line)["doc_id"] for line in samples.read_text().splitlines()] == [0, 1, 2, 3]


def test_lm_eval_raising_is_the_tasks_failure_with_its_first_line(evaluate, tmp_path: Path):
    script, _ = evaluate
    script.append(RuntimeError("dataset json failed to load\nTraceback ..."))
    with pytest.raises(TaskFailure) as err:
        run_task(task="t", tm=None, endpoint=ENDPOINT, generative=False, limit=None, items=None, seed=1,
                 samples_path=tmp_path / "s.jsonl")
    assert err.value.code == "failed:scoring"
    assert err.value.reason == "lm-eval failed on t: RuntimeError: dataset json failed to load"
    script.append(TaskFailure("failed:context", "3 of 9 prompts exceed the served context"))
    with pytest.raises(TaskFailure) as err:
        run_task(task="t", tm=None, endpoint=ENDPOINT, generative=True, limit=None, items=None, seed=1,
                 samples_path=tmp_path / "s.jsonl")
    assert err.value.code == "failed:context"  # raised inside the model: kept as it is


@pytest.mark.parametrize("out", [None, {"results": {}}, {"results": {"t": {"alias": "t"}}, "samples": {"t": []}}])
def test_output_quantgate_cannot_parse_is_a_tool_error_not_a_score(evaluate, tmp_path: Path, out):
    script, _ = evaluate
    script.append(out)
    with pytest.raises(ToolError, match=r"parsing lm-eval's output for t failed: .*a quantgate bug") as err:
        run_task(task="t", tm=None, endpoint=ENDPOINT, generative=False, limit=None, items=None, seed=1,
                 samples_path=tmp_path / "s.jsonl")
    assert not isinstance(err.value, TaskFailure) and err.value.exit_code == 1
    assert not (tmp_path / "s.jsonl").exists()  # nothing half-parsed is kept
