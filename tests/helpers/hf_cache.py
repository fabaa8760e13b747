"""A populated Hugging Face datasets cache for MMLU-Pro, built offline from synthetic questions.

Same schema as TIGER-Lab/MMLU-Pro (question_id, question, options[10], answer, answer_index, cot_content,
category, src; test and validation splits) and the same layout `datasets.load_dataset` leaves under
HF_HOME/datasets after a first download, so lm-eval's own task configs load it with no network.
No third-party text: every question is generated here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = "TIGER-Lab/MMLU-Pro"
LETTERS = "ABCDEFGHIJ"


def synthetic_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = 3 + i % 7, 2 + i % 5
        answer = a * b
        options = [str(answer + k - (i % 10)) for k in range(10)]
        idx = i % 10
        rows.append({"question_id": i, "question": f"What is {a} times {b}?", "options": options,
                     "answer": LETTERS[idx], "answer_index": idx,
                     "cot_content": f"A: Let's think step by step. {a} times {b} is {answer}. The answer is "
                                    f"({LETTERS[idx]}).",
                     "category": ("math", "other")[i % 2], "src": "quantgate-synthetic"})
    return rows


def build_mmlu_pro_cache(hf_home: Path, n_test: int = 40, n_val: int = 10) -> Path:
    """Write the prepared dataset under hf_home/datasets/TIGER-Lab___mmlu-pro/default/0.0.0/<hash>/."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = hf_home / "src"
    src.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(synthetic_rows(n_test)), src / "test.parquet")
    pq.write_table(pa.Table.from_pylist(synthetic_rows(n_val, offset=10_000)), src / "validation.parquet")
    name = camelcase_to_snakecase(REPO.split("/")[1])
    files = DataFilesDict.from_patterns({"test": [str(src / "test.parquet")],
                                         "validation": [str(src / "validation.parquet")]})
    cache = hf_home / "datasets"
    builder = Parquet(cache_dir=str(cache), dataset_name=name, data_files=files, config_name="default",
                      hash="0" * 16)
    builder.download_and_prepare()
    built = next((cache / name).iterdir())  # default-<config hash>
    dst = cache / f"{REPO.split('/')[0]}___{name}" / "default"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(dst))
    shutil.rmtree(cache / name, ignore_errors=True)
    shutil.rmtree(src)
    return hf_home
