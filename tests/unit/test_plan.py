"""`quantgate plan`: list scheduling over the executor's own cell graph, GPUs per cell from the weights (the
function the executor uses), and cell times scaled from a measured run (generative tasks by the tokens they
will generate). Expected times below are worked out by hand from the measured artifacts."""

import json
from pathlib import Path

import pytest

from qgcore.artifacts import BenchRun, EvalRun, TaskResult
from qgcore.serving import GPU_MEMORY_UTILIZATION, HEADROOM
from quantgate.cells import cell_graph
from quantgate.cli import main
from quantgate.plan import PlannedCell, build_plan, gpus_for, schedule
from tests.helpers.artifacts import write_manifest

GiB = 2**30


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
    with pytest.raises(ValueError, match="can never start"):
        schedule([PlannedCell("x", 1, 1, ("nothing",))], gpus=1)


def test_gpus_per_cell_follow_the_weights():
    per_gpu = 80 * GiB
    fits = per_gpu * GPU_MEMORY_UTILIZATION / HEADROOM  # the most weight bytes one GPU serves
    assert gpus_for(fits * 0.999, per_gpu) == 1 and gpus_for(fits * 1.001, per_gpu) == 2
    assert gpus_for(140e9, per_gpu) == 4  # 70B bf16: 140 GB x 1.3 over 0.85 x 80 GiB = 2.5 -> 4 (power of two)
    assert gpus_for(70e9, per_gpu) == 2 and gpus_for(35e9, per_gpu) == 1  # the same model at 8 and 4 bits
    assert gpus_for(fits * 5, per_gpu) == 8 and gpus_for(fits * 5, per_gpu, max_gpus=4) == 4
    assert gpus_for(140e9, 141 * GiB) == 2  # an H200 holds more


def _eval(name: str, wall: float, *, startup: float = 0.0, loglik: float = 0.0,
          gen: tuple[float, int, int] | None = None) -> EvalRun:
    tasks = {"ll": TaskResult(key="k", task="ll", status="scored", engine="vllm", wall_seconds=loglik, n_items=100)}
    if gen is not None:
        seconds, items, tokens = gen
        tasks["gen"] = TaskResult(key="k", task="gen", status="scored", engine="vllm", wall_seconds=seconds,
                                  n_items=items, generation={"completion_tokens": tokens, "requests": items})
    return EvalRun(variant=name, family="reference" if name == "bf16" else "8bit", status="served", engine="vllm",
                   platform={"kind": "cpu"}, manifest_key="k", tasks=tasks, wall_seconds=wall,
                   provenance={"sessions": [{"startup_seconds": startup}] if startup else []})


def _bench(name: str, wall: float, startup: float) -> BenchRun:
    return BenchRun(variant=name, status="served", key="k", tool={}, settings={}, levels=[], slo={}, memory={},
                    server={"startup_seconds": startup}, wall_seconds=wall)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A measured run: bf16 (2 GB: a 1B model) and fp8. bf16's eval: 10 s start-up, 60 s log-likelihood,
    20 s generating 1000 tokens over 10 items, 10 s the rest (divergence); fp8's: 80 s log-likelihood."""
    run = tmp_path / "run"
    write_manifest(run, "bf16", bytes_on_disk=2 * 10**9, wall_seconds=0)
    write_manifest(run, "fp8", bytes_on_disk=10**9, wall_seconds=20)
    _eval("bf16", 100, startup=10, loglik=60, gen=(20, 10, 1000)).write(run / "bf16" / "eval.json")
    _eval("fp8", 80, loglik=80).write(run / "fp8" / "eval.json")
    _bench("bf16", 50, startup=5).write(run / "bf16" / "bench.json")
    _bench("fp8", 40, startup=0).write(run / "fp8" / "bench.json")
    return run


def _cells(plan: dict) -> dict[str, tuple[float, float, int]]:
    return {c["id"]: (c["start"], c["end"], c["gpus"]) for c in plan["cells"]}


def test_plan_from_a_measured_run(run: Path):
    plan = build_plan(run, gpus=2, gpu_type="H100", params=None, speedup=1.0)
    assert plan["measured_params"] == 1e9 and plan["scale"] == 1.0
    assert plan["gpus_per_variant"] == {"bf16": 1, "fp8": 1}
    assert plan["sequential_seconds"] == 0 + 20 + 100 + 80 + 50 + 40
    # quantize side by side; each eval after its own checkpoint; bf16's bench after both evals; fp8's bench on
    # both GPUs (its pairs run against the reference beside it) after bf16's bench
    assert _cells(plan) == {"quantize:bf16": (0, 0, 1), "quantize:fp8": (0, 20, 1), "eval:bf16:0": (0, 100, 1),
                            "eval:fp8:0": (20, 100, 1), "bench:bf16": (100, 150, 1), "bench:fp8": (150, 190, 2)}
    assert plan["wall_seconds"] == 190


def test_the_plan_schedules_the_executors_cell_graph(run: Path):
    plan = build_plan(run, gpus=2, gpu_type="H100", params=None, speedup=1.0)
    graph = cell_graph(["bf16", "fp8"], plan["gpus_per_variant"], bench_gpus={"bf16": 1, "fp8": 2})
    assert {c["id"] for c in plan["cells"]} == {c.id for c in graph}
    slots = {c["id"]: c for c in plan["cells"]}
    for cell in graph:  # every dependency the executor waits for, the plan waits for
        assert slots[cell.id]["gpus"] == cell.gpus
        assert all(slots[need]["end"] <= slots[cell.id]["start"] for need in cell.needs), cell.id


def test_plan_scales_by_parameters_and_speedup(run: Path):
    scaled = build_plan(run, gpus=2, gpu_type="H100", params=2e9, speedup=4.0)
    assert scaled["scale"] == 0.5 and scaled["wall_seconds"] == 95  # every measured second x 2 / 4
    big = build_plan(run, gpus=8, gpu_type="H100", params=70e9, speedup=1.0)
    assert big["gpus_per_variant"] == {"bf16": 4, "fp8": 2}  # 140 GB -> 4 GPUs, 70 GB -> 2
    assert _cells(big)["bench:fp8"][2] == 6  # its own 2 and the reference's 4 fit on 8


def test_generative_tasks_scale_by_the_tokens_they_will_generate(run: Path):
    """Log-likelihood work scales with items; generative work with items x tokens per item over the tokens
    the measured run generated; the given start-up replaces the measured one."""
    same = build_plan(run, gpus=2, gpu_type="H100", params=None, speedup=1.0, items_scale=10)
    cells = _cells(same)
    assert cells["eval:bf16:0"][1] - cells["eval:bf16:0"][0] == 10 + 60 * 10 + 20 * 10 + 10
    longer = build_plan(run, gpus=2, gpu_type="H100", params=None, speedup=1.0, items_scale=10,
                        gen_tokens_per_item=500, startup_seconds=300)
    cells = _cells(longer)
    # 100 items x 500 tokens = 50,000 tokens, 50x the 1000 measured in 20 s
    assert cells["eval:bf16:0"][1] - cells["eval:bf16:0"][0] == 300 + 600 + 20 * 50 + 10
    assert cells["eval:fp8:0"][1] - cells["eval:fp8:0"][0] == 300 + 800  # no generative task: tokens do nothing
    assert cells["bench:bf16"][1] - cells["bench:bf16"][0] == (50 - 5) + 300


def test_plan_cli(run: Path, tmp_path: Path, capsys):
    assert main(["plan", "--gpus", "2", "--from", str(run)]) == 0
    out = capsys.readouterr().out
    assert "estimated wall time 0.05 h (one after another: 0.08 h)" in out and "eval:bf16:0" in out
    assert main(["plan", "--gpus", "2", "--from", str(run), "--params", "70e9"]) == 3  # bf16 needs 4 GPUs
    assert "cells need more GPUs than the cluster has (2)" in capsys.readouterr().err
    assert main(["plan", "--gpus", "0", "--from", str(run)]) == 3
    assert "--gpus must be >= 1" in capsys.readouterr().err


def test_plan_from_a_run_without_artifacts_is_an_artifact_error(tmp_path: Path, capsys):
    assert main(["plan", "--gpus", "2", "--from", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"quantgate: error: {tmp_path / 'none'} has no reference manifest: plan from a finished run " \
        "(make all)"
    bad = tmp_path / "bad"
    (bad / "bf16").mkdir(parents=True)
    (bad / "bf16" / "manifest.json").write_text(json.dumps({"wall_seconds": 1}))  # an old or foreign manifest
    assert main(["plan", "--gpus", "2", "--from", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"quantgate: error: invalid {bad / 'bf16' / 'manifest.json'}: ") and \
        err.endswith("rerun `make quantize`") and len(err.splitlines()) == 1
