"""A populated Hugging Face datasets cache for MMLU-Pro, built offline from synthetic questions.

Same schema as TIGER-Lab/MMLU-Pro (question_id, question, options[10], answer, answer_index, cot_content,
category, src; test and validation splits), every one of lm-eval's 14 `mmlu_pro` categories, and the same
layout `datasets.load_dataset` leaves under HF_HOME/datasets after a first download, so lm-eval's own task
configs load it with no network. Prompts have MMLU-Pro's real length: each question carries a passage of
`facts` short facts (~10 tokens each), so lm-eval's 5-shot chain-of-thought prompt is 1.5-3k tokens, while
each worked answer is short (a model can finish it well inside a small generation budget). No third-party
text: every question is generated here.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

REPO = "TIGER-Lab/MMLU-Pro"
LETTERS = "ABCDEFGHIJ"
# lm-eval's tasks/mmlu_pro/utils.py process_docs subjects, one per subtask
CATEGORIES = ("biology", "business", "chemistry", "computer science", "economics", "engineering", "health",
              "history", "law", "math", "other", "philosophy", "physics", "psychology")
THINGS = ("apples", "bolts", "coins", "files", "cells", "shares", "doses", "letters", "cases", "tiles", "parts",
          "books", "atoms", "notes")


def _row(qid: int, category: str, rng: random.Random, facts: int) -> dict:
    thing = THINGS[CATEGORIES.index(category)]
    counts = [rng.randint(10, 99) for _ in range(facts)]
    passage = " ".join(f"Crate {i + 1} holds {c} {thing}." for i, c in enumerate(counts))
    asked = rng.randrange(facts)
    answer = counts[asked]
    idx = rng.randrange(10)
    options = [str(answer + k - idx) for k in range(10)]  # ten distinct numbers, the answer at idx
    return {"question_id": qid, "question": f"{passage}\nHow many {thing} does crate {asked + 1} hold?",
            "options": options, "answer": LETTERS[idx], "answer_index": idx,
            "cot_content": f"A: Let's think step by step. The passage says crate {asked + 1} holds {answer} {thing}. "
                           f"The answer is ({LETTERS[idx]}).",
            "category": category, "src": "quantgate-synthetic"}


def synthetic_rows(per_category: int, *, offset: int = 0, facts: int = 28, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + offset)
    return [_row(offset + c * per_category + i, cat, rng, facts)
            for c, cat in enumerate(CATEGORIES) for i in range(per_category)]


def build_mmlu_pro_cache(hf_home: Path, *, test_per_category: int = 2, val_per_category: int = 5,
                         facts: int = 28) -> Path:
    """Write the prepared dataset under hf_home/datasets/TIGER-Lab___mmlu-pro/default/0.0.0/<hash>/."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = hf_home / "src"
    src.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(synthetic_rows(test_per_category, facts=facts)), src / "test.parquet")
    pq.write_table(pa.Table.from_pylist(synthetic_rows(val_per_category, offset=10_000, facts=facts)),
                   src / "validation.parquet")
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
