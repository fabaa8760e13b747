import json

import pytest

from qgcore import corpus
from qgcore.errors import ConfigError
from quantize.calibration import load_texts
from quantize.recipe import CalibrationSpec


def test_builtin_is_real_text_seeded_and_disjoint_from_heldout():
    a, prov = load_texts(CalibrationSpec(num_samples=16, seed=0))
    b, _ = load_texts(CalibrationSpec(num_samples=16, seed=0))
    c, _ = load_texts(CalibrationSpec(num_samples=16, seed=1))
    assert a == b and a != c
    assert all(len(t) >= 200 and " " in t for t in a)
    assert prov.startswith("python-stdlib-docstrings/calibration@")
    assert not set(corpus.documents("calibration")) & set(corpus.documents("heldout"))


def test_file_sources(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"paragraph number {i} with some words" for i in range(10)))
    texts, prov = load_texts(CalibrationSpec(source="file", dataset=str(txt), num_samples=4))
    assert len(texts) == 4 and prov.startswith("file:c.txt@")
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    texts, _ = load_texts(CalibrationSpec(source="file", dataset=str(jl), num_samples=5))
    assert sorted(texts) == [f"row {i}" for i in range(5)]


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="calibration file not found"):
        load_texts(CalibrationSpec(source="file", dataset=str(tmp_path / "nope.txt")))
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"content": "x"}\n')
    with pytest.raises(ConfigError, match="'text' field"):
        load_texts(CalibrationSpec(source="file", dataset=str(jl), num_samples=1))
    small = tmp_path / "s.txt"
    small.write_text("one\n\ntwo")
    with pytest.raises(ConfigError, match="has 2 samples, recipe asks for 64"):
        load_texts(CalibrationSpec(source="file", dataset=str(small)))
    with pytest.raises(ValueError, match="needs calibration.dataset"):
        CalibrationSpec(source="hub")
