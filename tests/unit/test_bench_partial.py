"""The bench stage when one variant goes wrong: the others are still benched and keep their artifacts, and the
lost one gets a bench.json with a typed status (qgcore.vocab). No vLLM here: the server, the load client and
the samplers are fakes; the stage's own sweep, pairing, artifact and status logic run for real.

The fake load client answers like a server whose p95 TTFT grows linearly with concurrency and crosses the SLO
(3 s) just above `cap`, with output throughput `tps` per unit of concurrency.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

import evals.bench_stage as bs
from evals.serve import ServerError
from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun, ModelRef
from qgcore.device import Platform
from qgcore.errors import EXIT_OK, EXIT_PARTIAL
from qgcore.integrity import record_files
from qgcore.run import RunContext
from qgcore.vocab import VARIANT_STATUSES, failed
from quantize.recipe import load_recipe

MODEL = ModelRef(model_id="tiny", path="/m", revision="sha256:abc", slug="tiny", source="local")
SHAPES = {"q_proj": [128, 128], "k_proj": [128, 64], "v_proj": [128, 64], "o_proj": [128, 128],
          "gate_proj": [128, 256], "up_proj": [128, 256], "down_proj": [256, 128], "lm_head": [128, 512]}
ARCH = {"max_position_embeddings": 2048, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
        "num_hidden_layers": 2, "head_dim": 32, "intermediate_size": 256, "vocab_size": 512}
QUANT = {
    "bf16": {"quantized": False, "dtype": "bfloat16"},
    "fp8": {"quantized": True, "format": "float-quantized", "weights": {"num_bits": 8, "type": "float"},
            "input_activations": {"num_bits": 8, "type": "float"}, "ignore": ["lm_head"]},
    "gptq-4": {"quantized": True, "format": "pack-quantized",
               "weights": {"num_bits": 4, "type": "int", "group_size": 64, "strategy": "group"},
               "input_activations": None, "ignore": ["lm_head"]},
}
SERVERS = {"bf16": {"cap": 6, "tps": 10.0}, "fp8": {"cap": 9, "tps": 12.0}, "gptq-4": {"cap": 12, "tps": 8.0}}
CONFIG = """workloads: [{name: random, input_len: 16, output_len: 8}]
start: 1
max_load: 16
prompts_per_load: 1
min_prompts: 2
warmup_prompts: 1
min_level_seconds: 0
repeats: 2
prometheus: false
scrape_interval_s: 0.01
"""


class World:
    """What the fakes share: servers started, levels run, and the faults to inject."""

    def __init__(self):
        self.starts: list[str] = []
        self.levels: list[tuple[str, int, str]] = []  # (variant, load, phase)
        self.fail_start: set[str] = set()
        self.no_result: set[tuple[str, int]] = set()  # (variant, load): the load generator writes nothing
        self.crash_after: dict[str, int] = {}  # variant -> its server dies after this many levels


@pytest.fixture
def world(monkeypatch) -> World:
    w = World()

    class FakeServer:
        def __init__(self, checkpoint, *, name, log_path, config, env, python, startup_timeout=600.0):
            self.checkpoint, self.name, self.log_path = checkpoint, name, log_path
            self.startup_timeout = startup_timeout
            self.port, self.url = 9, "http://127.0.0.1:9"
            self.proc = None

        def start(self):
            w.starts.append(self.name)
            if self.name in w.fail_start:
                raise self.error("vLLM exited with code 1 during start-up", "failed:start")
            self.proc = type("P", (), {"pid": os.getpid()})()
            return self

        def stop(self):
            self.proc = None

        def alive(self):
            done = sum(1 for name, _, _ in w.levels if name == self.name)
            return self.proc is not None and done < w.crash_after.get(self.name, 10**6)

        def error(self, headline, code):
            return ServerError(f"{headline}: RuntimeError: boom", log_tail=[f"{self.name}: last line"], code=code)

        def provenance(self):
            return {"engine": "vllm", "platform": "cpu"}

        def startup_info(self):
            return {"kv_cache_tokens": 4096, "kv_cache_bytes": 2 * 2**30, "checkpoint_bytes": 1000,
                    "sources": {"kv_cache_tokens": "fake", "kv_cache_bytes": "fake", "checkpoint_bytes": "fake"}}

    class FakeClient:
        def __init__(self, python, env):
            pass

        def start(self):
            return self

        def close(self):
            pass

        def run(self, argv, timeout):
            opt = {flag: argv[argv.index(flag) + 1] for flag in ("--model", "--max-concurrency", "--num-prompts",
                                                                  "--result-dir", "--result-filename")}
            name, load = opt["--model"], int(opt["--max-concurrency"])
            phase = re.match(r".+-c\d+-([a-z]+)", opt["--result-filename"]).group(1)  # <workload>-c<load>-<phase>
            if (name, load) in w.no_result:
                return "bench error: RuntimeError('boom')\n"
            w.levels.append((name, load, phase))
            s = SERVERS[name]
            tps = s["tps"] * load
            result = {"completed": int(opt["--num-prompts"]), "failed": 0, "duration": 1.0,
                      "request_throughput": tps / 8, "output_throughput": tps, "total_token_throughput": 3 * tps,
                      "p95_ttft_ms": 3000.0 * load / (s["cap"] + 0.5), "p95_itl_ms": 20.0, "errors": []}
            (Path(opt["--result-dir"]) / opt["--result-filename"]).write_text(json.dumps(result))
            return "ok\n"

    class FakeScraper:
        def __init__(self, url, interval):
            self.first, self.scrapes = {}, []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    class FakeSampler:
        peak_bytes, mean_bytes = 3 * 2**30, 2 * 2**30

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(bs, "VllmServer", FakeServer)
    monkeypatch.setattr(bs, "BenchClient", FakeClient)
    monkeypatch.setattr(bs, "MetricsScraper", FakeScraper)
    monkeypatch.setattr(bs, "PeakRSS", FakeSampler)
    monkeypatch.setattr(bs, "PeakGPU", FakeSampler)
    monkeypatch.setattr(bs, "_scrape_text", lambda url: "")
    monkeypatch.setattr(bs, "vllm_version", lambda python: "0.32.0-test")
    monkeypatch.setattr(bs.provenance, "hardware", lambda: {"device": "cpu", "cpu": "test"})
    return w


def _manifest(run: Path, name: str) -> CheckpointManifest:
    r = load_recipe(name)
    ckpt = run / name / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "name": name}))
    m = CheckpointManifest(
        content_key=f"k-{name}", model=MODEL, recipe=name, family=r.family, recipe_hash=r.content_hash(),
        recipe_spec=r.model_dump(mode="json"), calibration=None, calibration_data=None, versions={"torch": "x"},
        device={"device": "cpu"}, wall_seconds=1.0, peak_memory={"rss_bytes": 1 << 30}, bytes_on_disk=1000,
        checkpoint_dir="checkpoint", files=record_files(ckpt), quantization=QUANT[name], linear_shapes=SHAPES,
        architecture=ARCH, serve=r.serve.model_dump(), created_at="2026-01-01T00:00:00Z")
    m.write(run / name / "manifest.json")
    return m


def _stage(tmp_path: Path, names=("bf16", "fp8", "gptq-4"), isa: str = "avx512", force: bool = True) -> bs.BenchStage:
    run = tmp_path / "runs" / "tiny"
    for name in names:
        if not (run / name / "manifest.json").is_file():
            _manifest(run, name)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(CONFIG)
    cpu = Platform("cpu", cpu="test", cpu_isa=isa)
    ctx = RunContext(run_dir=run, model=None, platform=cpu, target=cpu, cache_dir=tmp_path / "cache",
                     serve_python=sys.executable)
    return bs.BenchStage(ctx, bs.BenchRequest(config_path=cfg, force=force), quiet=True)


def _bench(stage: bs.BenchStage, name: str) -> BenchRun:
    return BenchRun.read(stage.ctx.run_dir / name / "bench.json")


def _sweep_loads(run: BenchRun) -> list[int]:
    return [lv["load"] for lv in run.levels if lv["phase"] == "sweep"]


def test_everything_served(tmp_path: Path, world: World):
    stage = _stage(tmp_path)
    assert stage.run() == EXIT_OK
    ref, fp8, gptq = (_bench(stage, n) for n in ("bf16", "fp8", "gptq-4"))
    assert {r.status for r in (ref, fp8, gptq)} == {"served"}
    assert _sweep_loads(ref) == [1, 2, 4, 8, 6, 7]  # double, then bisect to the highest load meeting the SLO
    assert (ref.capacity["load"], fp8.capacity["load"], gptq.capacity["load"]) == (6, 9, 12)
    assert ref.capacity["stopped"] == "SLO missed at concurrency 8" and ref.throughput_vs_reference is None
    # the variants ran in pairs with the reference at the same load, the lower capacity (6): the ratio is the
    # checkpoints' speed at equal load, not the capacities' ratio; each capacity interval is at its own load
    assert gptq.throughput_vs_reference["ratio"] == pytest.approx(8.0 / 10.0)
    assert gptq.throughput_vs_reference["pairs"] == 2 and gptq.throughput_vs_reference["load"] == 6
    assert fp8.throughput_vs_reference["ratio"] == pytest.approx(12.0 / 10.0)
    assert gptq.capacity["output_tokens_per_s"] == pytest.approx(12 * 8.0) and gptq.capacity["repeats"] == 2
    assert {lv["load"] for lv in gptq.levels if lv["phase"] == "pair"} == {6}
    assert world.starts == ["bf16", "fp8", "gptq-4"]  # the reference stayed up beside each variant (CPU)
    pair_levels = [lv for lv in ref.levels if lv["phase"] == "pair"]  # recorded in the reference's file too
    assert len(pair_levels) == 4 and {lv["load"] for lv in pair_levels} == {6}
    assert gptq.memory["need_bytes"] == 1000 + gptq.memory["kv_bytes_per_token"] * 2048 * 12
    assert gptq.settings["economics"]["break_even"]["rule"].startswith("API spend")


def test_a_server_that_will_not_start_loses_only_its_variant(tmp_path: Path, world: World):
    world.fail_start.add("fp8")
    stage = _stage(tmp_path)
    assert stage.run() == EXIT_PARTIAL
    lost = _bench(stage, "fp8")
    assert lost.status == "failed:start" and failed(lost.status) and lost.status in VARIANT_STATUSES
    assert lost.reason.startswith("not benched: vLLM exited with code 1 during start-up")
    assert lost.server_log_tail == ["fp8: last line"] and lost.levels == [] and lost.capacity is None
    ref, gptq = _bench(stage, "bf16"), _bench(stage, "gptq-4")
    assert ref.status == gptq.status == "served" and gptq.capacity["load"] == 12
    assert gptq.throughput_vs_reference["ratio"] == pytest.approx(0.8)  # at the same load (6)
    # a rerun without --force keeps what was served and retries only the lost variant (paired with the reference)
    world.fail_start.clear()
    world.starts.clear()
    again = _stage(tmp_path, force=False)
    assert again.run() == EXIT_OK
    assert world.starts == ["bf16", "fp8"] and _bench(again, "fp8").status == "served"
    assert _bench(again, "gptq-4").key == gptq.key and _bench(again, "gptq-4").levels == gptq.levels


def test_a_server_that_dies_under_load_is_a_crash(tmp_path: Path, world: World):
    world.crash_after["fp8"] = 4  # warm-up, then loads 1, 2, 4; dead before 8
    stage = _stage(tmp_path)
    assert stage.run() == EXIT_PARTIAL
    lost = _bench(stage, "fp8")
    assert lost.status == "failed:crash" and failed(lost.status)
    assert "vLLM died before random at concurrency 8" in lost.reason
    assert _bench(stage, "bf16").status == _bench(stage, "gptq-4").status == "served"
    raw = sorted(p.name for p in (stage.ctx.run_dir / "fp8" / "bench-raw").glob("*.json"))
    assert raw == ["random-c1-sweep.json", "random-c1-warmup.json", "random-c2-sweep.json", "random-c4-sweep.json"]


def test_a_crash_keeps_the_levels_it_finished(tmp_path: Path, world: World):
    world.crash_after["fp8"] = 4
    stage = _stage(tmp_path)
    stage.run()
    lost = _bench(stage, "fp8")
    assert lost.status == "failed:crash" and _sweep_loads(lost) == [1, 2, 4]


def test_a_load_generator_failure_midway_keeps_finished_levels(tmp_path: Path, world: World):
    world.no_result.add(("fp8", 4))
    stage = _stage(tmp_path)
    assert stage.run() == EXIT_PARTIAL
    lost = _bench(stage, "fp8")
    assert lost.status == "failed:load" and failed(lost.status) and "concurrency 4" in lost.reason
    assert _sweep_loads(lost) == [1, 2]
    assert _bench(stage, "gptq-4").status == "served"


@pytest.mark.parametrize(("status", "vllm_status", "same_checkpoint", "want"), [
    ("emulated", "unsupported", True, "unsupported"),  # emulated in eval: vLLM has no kernel for it here
    ("unsupported", None, True, "unsupported"),
    ("failed:start", None, True, "skipped:unservable"),  # a broken checkpoint or flag: not started again
    ("failed:checkpoint", None, True, "skipped:unservable"),
    ("failed:crash", None, True, None),  # may be transient: bench tries
    ("served", None, True, None),
    ("failed:start", None, False, None),  # an eval of another build of the checkpoint says nothing about this one
])
def test_bench_does_not_restart_what_eval_could_not_serve(tmp_path: Path, world: World, status, vllm_status,
                                                          same_checkpoint, want):
    stage = _stage(tmp_path, names=("bf16", "fp8"))
    EvalRun(variant="fp8", family="8bit", status=status, vllm_status=vllm_status, reason="eval said so",
            engine="vllm", platform={"kind": "cpu"}, manifest_key="k-fp8" if same_checkpoint else "k-old",
            tasks={}).write(stage.ctx.run_dir / "fp8" / "eval.json")
    assert stage.run() == EXIT_OK  # an unservable variant is recorded, not a failure of the stage
    run = _bench(stage, "fp8")
    if want is None:
        assert "fp8" in world.starts and run.status == "served"
    else:
        assert "fp8" not in world.starts and run.status == want and not failed(run.status)
        assert run.reason == f"not benched: eval found it {vllm_status or status}: eval said so" and not run.levels


def test_the_kernel_preflight_skips_w4a16_on_an_avx2_cpu(tmp_path: Path, world: World):
    stage = _stage(tmp_path, names=("bf16", "gptq-4"), isa="avx2")
    assert stage.run() == EXIT_OK
    run = _bench(stage, "gptq-4")
    assert run.status == "unsupported" and "gptq-4" not in world.starts
    assert run.reason.startswith("not benched: unsupported on CPU (test, avx2): ") and "cpu_gemm_wna16" in run.reason
    assert _bench(stage, "bf16").status == "served"
