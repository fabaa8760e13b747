"""`quantgate plan`: list scheduling over the cell graph, and GPUs per cell from the weights."""

import json
from pathlib import Path

import pytest

from quantgate.cli import main
from quantgate.plan import PlannedCell, build_plan, gpus_for, schedule


def test_schedule_respects_dependencies_and_gpu_capacity():
    cells = [PlannedCell("q:a", 10, 1, ()), PlannedCell("q:b", 30, 1, ()),
             PlannedCell("e:a", 20, 2, ("q:a",)), PlannedCell("e:b", 5, 2, ("q:b", "e:a"))]
    slots = {s.id: s for s in schedule(cells, gpus=2)}
    assert slots["q:b"].start == 0 and slots["q:a"].start == 0  # both fit at once
    assert slots["e:a"].start == 30  # needs both GPUs: waits for q:b to free its GPU
    assert slots["e:b"].start == 50 and slots["e:b"].end == 55
    one = {s.id: s for s in schedule(cells, gpus=4)}
    assert one["e:a"].start == 10 and max(s.end for s in one.values()) == 35
    with pytest.raises(ValueError, match="more GPUs"):
        schedule(cells, gpus=1)


def test_gpus_per_cell_follow_the_weights():
    assert gpus_for(70e9, "bf16", 80) == 4  # 140 GB x 1.3 over 80 GiB -> 2.1 -> 4 (power of two)
    assert gpus_for(70e9, "8bit", 80) == 2 and gpus_for(70e9, "4bit", 80) == 1
    assert gpus_for(8e9, "bf16", 80) == 1


def test_plan_from_a_measured_run(tmp_path: Path, capsys):
    run = tmp_path / "run"
    for name, fam, q, e, b in (("bf16", "bf16", 0, 100, 50), ("fp8", "8bit", 20, 80, 40)):
        (run / name).mkdir(parents=True)
        (run / name / "manifest.json").write_text(json.dumps({"wall_seconds": q, "bytes_on_disk": 2e9,
                                                              "recipe_spec": {"family": fam}}))
        (run / name / "eval.json").write_text(json.dumps({"wall_seconds": e}))
        (run / name / "bench.json").write_text(json.dumps({"wall_seconds": b}))
    plan = build_plan(run, gpus=2, gpu_type="H100", params=None, speedup=1.0)
    assert plan["measured_params"] == 1e9 and plan["scale"] == 1.0
    assert plan["sequential_seconds"] == 290
    # bf16 eval (100) then fp8 eval (80, after its 20 s quantize and bf16's eval), then both benches side by side
    assert plan["wall_seconds"] == 100 + 80 + 50
    scaled = build_plan(run, gpus=2, gpu_type="H100", params=2e9, speedup=4.0)
    assert scaled["scale"] == 0.5 and scaled["wall_seconds"] == 115
    # start-up replaced, scoring work scaled: bf16 eval 100 s measured of which 40 s start-up
    ev = run / "bf16" / "eval.json"
    ev.write_text(json.dumps({"wall_seconds": 100, "server": {"startup_seconds": 40}}))
    big = build_plan(run, gpus=2, gpu_type="H100", params=None, speedup=1.0, items_scale=10, startup_seconds=300)
    bf16_eval = next(c for c in big["cells"] if c["id"] == "eval:bf16")
    assert bf16_eval["end"] - bf16_eval["start"] == 60 * 10 + 300
    assert main(["plan", "--gpus", "2", "--from", str(run)]) == 0
    assert "estimated wall time" in capsys.readouterr().out
    assert main(["plan", "--gpus", "2", "--from", str(tmp_path / "none")]) == 3
