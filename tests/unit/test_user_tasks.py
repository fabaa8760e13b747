from pathlib import Path

import pytest

from evals.quality import check_tasks, task_manager
from evals.tasks import task_info, user_task_hash
from qgcore.errors import ConfigError

TASK = """task: my_yes_no
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


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    (d / "data.jsonl").write_text('{"q": "Is water wet?", "a": 1}\n{"q": "Is fire cold?", "a": 0}\n')
    (d / "my_yes_no.yaml").write_text(TASK.replace("DATA", str(d / "data.jsonl")))
    return d


def test_user_task_folder_is_registered(user_dir):
    tm = task_manager([user_dir])
    check_tasks(["my_yes_no"], tm)
    info = task_info("my_yes_no", tm)
    assert (info.output_type, info.dataset_path) == ("multiple_choice", "json")
    with pytest.raises(ConfigError, match="Unknown task 'my_yes_nope'. Did you mean: my_yes_no"):
        check_tasks(["my_yes_nope"], tm)


def test_user_task_hash_changes_with_its_files(user_dir):
    before = user_task_hash(user_dir, "my_yes_no")
    (user_dir / "data.jsonl").write_text('{"q": "Is ice cold?", "a": 1}\n')
    assert user_task_hash(user_dir, "my_yes_no") != before
