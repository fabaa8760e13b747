"""From a verdict to a deploy kit: a Kubernetes Deployment + Service serving the promoted variant with the flags
the bench served, a KEDA ScaledObject whose thresholds come from the measured knee, Prometheus alerts with a
promtool unit test, all validated with the real tools (kubernetes-validate, promtool).

The run is synthetic but built with the project's own pieces: manifests and run.json through qgcore.artifacts
and quantgate.context.record_run, and each bench.json records the server command the bench stage's own
VllmServer builds from the run context (what `make bench` served).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from evals.prom import queries
from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun
from qgcore.device import Platform
from qgcore.run import RunContext
from qgcore.serving import server_environment
from quantgate.cli import main
from quantgate.context import record_run, resolve
from reports.data import _inputs
from reports.deploy import HEADROOM, check_kit, promtool_test, validate_scaled_object, write_kit
from reports.stage import run_deploy
from tests.helpers.artifacts import H100, write_manifest

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {"bf16": "reference", "fp8-kv": "8bit", "fp8": "8bit"}
LOADS = (1, 2, 4, 8, 16, 12)  # the sweep as it ran: doubling until the SLO broke at 16, then bisecting to 12
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian `prometheus` package): kits cannot be checked")


def sweep(capacity: int, kv_per_seq: float = 0.06, queue_past: float = 12.5) -> list[dict[str, Any]]:
    """Sweep levels with the PromQL the bench's Prometheus returned at each one's end: KV occupancy grows with
    load, requests wait only past capacity."""
    return [{"workload": "random", "phase": "sweep", "load": load, "meets_slo": load <= capacity,
             "promql": {"kv_cache_usage": kv_per_seq * load, "waiting": 0.0 if load <= capacity else queue_past}}
            for load in LOADS]


def write_bench(ctx: RunContext, name: str, *, capacity: int | None = 8, status: str = "served",
                raw: list[dict[str, Any]] | None = None, levels: list[dict[str, Any]] | None = None) -> list[str]:
    """bench.json as the bench stage writes it, with the server command its VllmServer runs; returns the command."""
    from evals.perf import BenchConfig
    from evals.serve import VllmServer

    vdir = ctx.run_dir / name
    manifest = CheckpointManifest.read(vdir / "manifest.json")
    cfg = ctx.serve_config(manifest, "bench")
    server = VllmServer(vdir / manifest.checkpoint_dir, name=name, log_path=vdir / "logs" / "bench-server.log",
                        config=cfg, env=server_environment(cfg, {}, cache_root=ctx.cache_dir), python="python")
    command = server.command()[1:]
    if levels is None:
        levels = sweep(capacity) if capacity else []
    BenchRun(variant=name, status=status, key=f"k-{name}", tool={"name": "vllm bench serve", "version": "0.32.0"},
             settings=BenchConfig().model_dump(mode="json"), levels=levels,
             slo={"ttft_p95_s": 3.0}, memory={}, capacity={"load": capacity, "max_num_seqs": capacity},
             server={"command": command},
             prometheus={"queries": queries(name), "raw": raw or []}).write(vdir / "bench.json")
    return command


def write_verdict(run_dir: Path, verdicts: dict[str, str]) -> None:
    """A synthetic verdict over the artifacts as they are now (read_verdict refuses one whose inputs changed)."""
    promoted = [n for n, v in verdicts.items() if v == "promote"]
    verdict = {"schema_version": 3, "kind": "verdict", "variants": {n: {"verdict": v} for n, v in verdicts.items()},
               "recommended": promoted[0] if promoted else None, "passed": bool(promoted),
               "inputs": _inputs(run_dir)}
    (run_dir / "verdict.json").write_text(json.dumps(verdict))


def make_run(tmp_path: Path, verdicts: dict[str, str], *, platform: Platform = H100, target_gpu: str | None = None,
             tensor_parallel: str | None = "fp8-kv=2", max_model_len: int | None = 1024,
             benches: dict[str, dict[str, Any]] | None = None) -> tuple[RunContext, dict[str, list[str]]]:
    ctx = resolve(runs_root=tmp_path, model="org/tiny", platform=platform, target_gpu=target_gpu,
                  tensor_parallel=tensor_parallel, max_model_len=max_model_len)
    for name in FAMILIES:
        write_manifest(ctx.run_dir, name)
    record_run(ctx, declared=list(FAMILIES), families=FAMILIES)
    commands = {}
    for name in FAMILIES:
        EvalRun(variant=name, family=FAMILIES[name], status="served", engine="vllm", platform=platform.to_dict(),
                manifest_key=f"k-{name}", tasks={}).write(ctx.run_dir / name / "eval.json")
        commands[name] = write_bench(ctx, name, **(benches or {}).get(name, {}))
    write_verdict(ctx.run_dir, verdicts)
    return ctx, commands


def flags(argv: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--switch` pairs of a vLLM command line, in order."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def kit_objects(kit: Path) -> dict[str, Any]:
    deployment, service = yaml.safe_load_all((kit / "deployment.yaml").read_text())
    (scaled,) = yaml.safe_load_all((kit / "scaledobject.yaml").read_text())
    return {"deployment": deployment, "service": service, "scaledobject": scaled,
            "rules": yaml.safe_load((kit / "alerts.yaml").read_text())}


def container(objs: dict[str, Any]) -> dict[str, Any]:
    (c,) = objs["deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def trigger(objs: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in objs["scaledobject"]["spec"]["triggers"] if t["name"] == name)


# ---- the kit for the promoted variant ------------------------------------------------------------------------------

@pytest.fixture
def promoted(tmp_path: Path, capsys) -> tuple[RunContext, dict[str, list[str]], Path]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing (Debian `prometheus` package): run_deploy validates every kit with it")
    ctx, commands = make_run(tmp_path, {"fp8-kv": "promote", "fp8": "reject"})
    assert run_deploy(ctx.run_dir) == 0
    kit = ctx.run_dir / "deploy" / "fp8-kv"
    assert f"deploy kit: {kit} (validated" in capsys.readouterr().out
    return ctx, commands, kit


def test_the_kit_is_written_for_the_promoted_variant_only(promoted):
    ctx, _, kit = promoted
    assert sorted(p.name for p in kit.iterdir()) == ["README.md", "alerts.yaml", "deployment.yaml", "derivation.json",
                                                    "scaledobject.yaml"]
    assert sorted(p.name for p in (ctx.run_dir / "deploy").iterdir()) == ["fp8-kv"]  # not the rejected fp8
    assert check_kit(kit) == []  # valid as written, by the real tools


def test_the_deployment_serves_exactly_what_the_bench_served(promoted):
    _, commands, kit = promoted
    objs = kit_objects(kit)
    c = container(objs)
    served = flags(commands["fp8-kv"])
    deployed = flags(c["args"])
    assert c["command"] == ["vllm", "serve"] and c["args"][0] == "/models/fp8-kv"
    # every flag the bench served with, with its value, except where this process listened
    bench_only = {"--model", "--host", "--port"}
    assert {k: v for k, v in served.items() if k not in bench_only} == \
        {k: v for k, v in deployed.items() if k not in ("--port", "--max-num-seqs")}
    assert (deployed["--tensor-parallel-size"], deployed["--max-model-len"], deployed["--kv-cache-dtype"]) == \
        ("2", "1024", "fp8")  # TP and context from the run's serving plan, the KV dtype from the recipe
    assert deployed["--served-model-name"] == "fp8-kv"  # the model_name label every PromQL below selects on
    assert deployed["--max-num-seqs"] == "8"  # the measured capacity
    assert deployed["--port"] == "8000" == str(c["ports"][0]["containerPort"])
    assert objs["service"]["spec"]["selector"] == objs["deployment"]["spec"]["selector"]["matchLabels"]
    assert objs["scaledobject"]["spec"]["scaleTargetRef"]["name"] == objs["deployment"]["metadata"]["name"]


def test_the_deployment_requests_the_gpus_the_serving_plan_said(promoted):
    ctx, _, kit = promoted
    serving = json.loads((ctx.run_dir / "run.json").read_text())["serving"]["fp8-kv"]
    assert serving["tensor_parallel"] == serving["gpus"] == 2  # --tensor-parallel fp8-kv=2 on the GPU platform
    res = container(kit_objects(kit))["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == serving["gpus"]


def test_scaler_thresholds_come_from_the_measured_knee(promoted):
    _, _, kit = promoted
    objs = kit_objects(kit)
    # capacity 8: KV occupancy there was 0.06 x 8; the first load past it (12) had 12.5 requests waiting
    assert float(trigger(objs, "kv-cache")["metadata"]["threshold"]) == pytest.approx(0.48 * (1 - HEADROOM))
    assert float(trigger(objs, "queue")["metadata"]["threshold"]) == pytest.approx(12.5 * (1 - HEADROOM))
    derivation = json.loads((kit / "derivation.json").read_text())
    assert derivation["capacity_concurrency"] == 8 and derivation["kv"]["value_at_knee"] == pytest.approx(0.48)
    assert derivation["waiting"]["value_past_knee"] == 12.5


def test_other_measurements_give_other_thresholds(tmp_path: Path):
    kit_for = {}
    for cap, queue in ((4, 30.0), (12, 0.5)):
        objs = write_kit(tmp_path / str(cap), "fp8", "vllm serve /ckpt --served-model-name fp8 --seed 0",
                         {"settings": {"workloads": [{"name": "random"}]}, "capacity": {"load": cap},
                          "levels": sweep(cap, queue_past=queue), "prometheus": {"queries": queries("fp8")}},
                         {"tensor_parallel": 1}, "promote")
        kit_for[cap] = objs["scaledobject"]["spec"]["triggers"]
    assert float(kit_for[4][1]["metadata"]["threshold"]) == pytest.approx(0.06 * 4 * (1 - HEADROOM))
    assert float(kit_for[4][0]["metadata"]["threshold"]) == pytest.approx(30.0 * (1 - HEADROOM))
    assert float(kit_for[12][1]["metadata"]["threshold"]) == pytest.approx(0.06 * 12 * (1 - HEADROOM))
    assert float(kit_for[12][0]["metadata"]["threshold"]) == 1.0  # 0.5 waiting past the knee: at least one


def test_every_promql_metric_is_one_vllm_exports_with_the_model_name_label(promoted):
    _, _, kit = promoted
    objs = kit_objects(kit)
    exprs = [t["metadata"]["query"] for t in objs["scaledobject"]["spec"]["triggers"]]
    exprs += [r["expr"] for g in objs["rules"]["groups"] for r in g["rules"]]
    used = {}
    for expr in exprs:
        for metric, selector in re.findall(r"(vllm:[A-Za-z0-9_:]+)\{([^}]*)\}", expr):
            assert selector == 'model_name="fp8-kv"', expr
            used[metric.removesuffix("_bucket")] = expr
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= set(used)
    # a real vLLM 0.32 /metrics scrape (CPU build): the scaler's gauges, labelled by the served name
    scrape = (ROOT / "tests" / "fixtures" / "vllm" / "cpu_metrics.txt").read_text()
    for gauge in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert re.search(rf'^{re.escape(gauge)}{{[^}}]*model_name="bf16"[^}}]*}} ', scrape, re.M), gauge
    # and every metric against the installed vLLM's own definitions (the histograms too)
    loggers = sorted(ROOT.glob(".venvs/serve/lib/python*/site-packages/vllm/v1/metrics/loggers.py"))
    if not loggers:
        pytest.skip("no serving venv (.venvs/serve): checked against the recorded scrape only")
    source = loggers[0].read_text()
    assert 'labelnames = ["model_name", "engine"]' in source
    for metric in used:
        m = re.search(rf'name="{re.escape(metric)}",.*?labelnames=(\w+)', source, re.S)
        assert m is not None and m.group(1) == "labelnames", f"{metric} is not a vLLM metric with model_name"


def test_a_rejected_verdict_deploys_nothing_unless_asked_for_all(tmp_path: Path, capsys):
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing (Debian `prometheus` package): run_deploy validates every kit with it")
    ctx, _ = make_run(tmp_path, {"fp8-kv": "reject", "fp8": "inconclusive"},
                      benches={"fp8": {"status": "failed:crash", "capacity": None}})
    assert main(["deploy", str(ctx.run_dir)]) == 0  # no kit is a result, not a failure
    assert "deploy: no promoted variant: no kit written (`quantgate deploy --all` writes one per served variant)" \
        in capsys.readouterr().out
    assert not (ctx.run_dir / "deploy").exists()
    assert main(["deploy", "--all", str(ctx.run_dir)]) == 0
    assert sorted(p.name for p in (ctx.run_dir / "deploy").iterdir()) == ["fp8-kv"]  # fp8's bench never served
    assert "deploy/fp8-kv" in capsys.readouterr().out and "Deploy kit: fp8-kv (reject)" in \
        (ctx.run_dir / "deploy" / "fp8-kv" / "README.md").read_text()


def test_a_promoted_variant_without_a_served_bench_is_an_artifact_error(tmp_path: Path, capsys):
    ctx, _ = make_run(tmp_path, {"fp8-kv": "promote", "fp8": "reject"},
                      benches={"fp8-kv": {"status": "skipped:unservable", "capacity": None}})
    assert main(["deploy", str(ctx.run_dir)]) == 1
    assert "fp8-kv: no served bench.json to size a deployment from: run `make bench`" in capsys.readouterr().err


def test_a_verdict_on_changed_artifacts_is_refused(tmp_path: Path, capsys):
    ctx, _ = make_run(tmp_path, {"fp8-kv": "promote", "fp8": "reject"})
    write_bench(ctx, "fp8-kv", capacity=16)  # re-benched after the gate decided
    assert main(["deploy", str(ctx.run_dir)]) == 1
    assert "fp8-kv/bench.json changed since): rerun `make gate`" in capsys.readouterr().err
    assert not (ctx.run_dir / "deploy").exists()


def test_a_cpu_measured_run_deploys_to_its_target_gpu_with_the_measured_serving_flags(tmp_path: Path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing (Debian `prometheus` package): run_deploy validates every kit with it")
    cpu = Platform("cpu", cpu="test cpu", source="test")
    ctx, commands = make_run(tmp_path, {"fp8-kv": "promote", "fp8": "reject"}, platform=cpu, target_gpu="H100",
                             tensor_parallel=None)
    assert run_deploy(ctx.run_dir) == 0
    c = container(kit_objects(ctx.run_dir / "deploy" / "fp8-kv"))
    served, deployed = flags(commands["fp8-kv"]), flags(c["args"])
    assert "--enforce-eager" in served and "--enforce-eager" not in deployed  # a CPU-build flag stays behind
    assert deployed["--gpu-memory-utilization"] == "0.85"
    for flag in ("--max-model-len", "--kv-cache-dtype", "--seed", "--enable-prefix-caching", "--served-model-name"):
        assert deployed[flag] == served[flag], flag
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1


# ---- check_kit fails on broken kits -------------------------------------------------------------------------------

def _edit(kit: Path, file: str, change) -> None:  # noqa: ANN001
    docs = list(yaml.safe_load_all((kit / file).read_text()))
    change(docs)
    (kit / file).write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))


def _deployment_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return docs[0]["spec"]


@pytest.mark.parametrize(("file", "change", "problem"), [
    ("deployment.yaml", lambda d: _deployment_spec(d).pop("selector"),
     "Deployment: 'selector' is a required property"),
    ("deployment.yaml", lambda d: _deployment_spec(d)["template"]["spec"]["containers"][0].pop("name"),
     "Deployment: 'name' is a required property"),
    ("deployment.yaml", lambda d: d[1]["spec"]["ports"][0].update(port="http"), "Service: 'http' is not of type"),
    ("deployment.yaml", lambda d: _deployment_spec(d).update(replica=2), "Deployment: "),  # strict: unknown field
    ("scaledobject.yaml", lambda d: d[0]["spec"].update(maxReplicas=4), "ScaledObject: spec.maxReplicas"),
    ("scaledobject.yaml", lambda d: d[0]["spec"]["triggers"][0]["metadata"].update(threshold="80%"),
     "ScaledObject: spec.triggers.0.metadata.threshold"),
    ("scaledobject.yaml", lambda d: d[0]["spec"]["triggers"][0]["metadata"].pop("query"),
     "ScaledObject: spec.triggers.0.metadata.query"),
    ("scaledobject.yaml", lambda d: d[0]["spec"].update(minReplicaCount=9),
     "ScaledObject: spec.minReplicaCount is greater than spec.maxReplicaCount"),
    ("scaledobject.yaml", lambda d: d[0].update(apiVersion="keda.sh/v1"), "ScaledObject: apiVersion"),
    ("alerts.yaml", lambda d: d[0]["groups"][0]["rules"][0].update(expr="histogram_quantile(0.95, "),
     "promtool check rules"),
])
def test_check_kit_fails_on_a_broken_kit(promoted, file, change, problem):
    _, _, kit = promoted
    _edit(kit, file, change)
    problems = check_kit(kit)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_check_kit_reports_a_wrong_api_version(promoted):
    _, _, kit = promoted
    _edit(kit, "deployment.yaml", lambda d: d[0].update(apiVersion="apps/v1beta1"))
    problems = check_kit(kit)
    assert len(problems) == 1 and problems[0].startswith("Deployment: ")


def test_the_keda_schema_is_strict_about_documented_fields():
    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
            "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [
                {"type": "prometheus",
                 "metadata": {"serverAddress": "http://p:9090", "query": "up", "threshold": "2"}}]}}
    assert validate_scaled_object(good) is None
    assert validate_scaled_object(good | {"spec": good["spec"] | {"triggers": []}}) is not None  # at least one
    cpu = {"type": "cpu", "metadata": {"value": "50"}}
    assert validate_scaled_object(good | {"spec": good["spec"] | {"triggers": [cpu]}}) is not None  # Prometheus only
    assert validate_scaled_object(good | {"spec": good["spec"] | {"scaleTargetRef": {}}}) is not None  # name required


# ---- autoscaling semantics ---------------------------------------------------------------------------------------

def _hpa_desired(metric_type: str, value: float, threshold: float, current: int) -> int:
    """What the HPA asks for from one external metric (Kubernetes' documented algorithm): AverageValue divides
    the query's value over the replicas, Value compares it as it is."""
    if metric_type == "AverageValue":
        return math.ceil(value / threshold)
    return math.ceil(current * value / threshold)


def test_a_growing_queue_scales_the_fleet_out(promoted):
    _, _, kit = promoted
    queue = trigger(kit_objects(kit), "queue")
    t = float(queue["metadata"]["threshold"])
    # the query is a sum over replicas: 4 replicas with twice the threshold waiting each want 8
    assert _hpa_desired(queue["metricType"], 4 * 2 * t, t, current=4) == 8
    assert _hpa_desired(queue["metricType"], 4 * 0.5 * t, t, current=4) == 2  # half of it: scale in


def test_a_saturated_kv_cache_never_scales_the_fleet_in(promoted):
    _, _, kit = promoted
    kv = trigger(kit_objects(kit), "kv-cache")
    t = float(kv["metadata"]["threshold"])
    for replicas in (1, 2, 4, 8):  # every replica's KV cache at 90%, well above the threshold
        assert _hpa_desired(kv["metricType"], 0.9, t, current=replicas) >= replicas


# ---- the promtool unit test over the recorded series --------------------------------------------------------------

def recorded_series(name: str, n: int = 30) -> list[dict[str, Any]]:
    """Cumulative histogram buckets as Prometheus recorded them, one sample a step: 10 requests a step, TTFT
    0.3 s and ITL 20 ms for the first half, then TTFT 7 s (over the 3 s page) and ITL 70 ms (over chat's 50 ms,
    under batch's 100 ms)."""
    out = []
    for metric, les, fast, slow in (("vllm:time_to_first_token_seconds", (0.5, 1, 2.5, 5, 10, math.inf), 0.3, 7.0),
                                    ("vllm:inter_token_latency_seconds",
                                     (0.01, 0.025, 0.05, 0.075, 0.1, 0.5, math.inf), 0.02, 0.07)):
        for le in les:
            count, values = 1000.0, []  # counters long since started: no extrapolation to zero
            for t in range(n):
                count += 10 if (fast if t < n // 2 else slow) <= le else 0
                values.append(count)
            out.append({"metric": {"__name__": f"{metric}_bucket", "le": "+Inf" if le == math.inf else f"{le:g}",
                                   "model_name": name, "engine": "0"}, "values": values})
    return out


def _expected(test: dict[str, Any]) -> dict[tuple[str, bool], str]:
    return {(a["alertname"], bool(a["exp_alerts"])): a["eval_time"] for a in test["tests"][0]["alert_rule_test"]}


def test_promtool_expectations_are_computed_from_the_recorded_series():
    test = promtool_test("fp8-kv", recorded_series("fp8-kv"))
    got = _expected(test)
    # TTFT and chat ITL: quiet through the fast half, firing in the slow one; batch ITL never fires
    assert set(got) == {("VLLMTimeToFirstTokenHigh", True), ("VLLMTimeToFirstTokenHigh", False),
                        ("VLLMInterTokenLatencyHighChat", True), ("VLLMInterTokenLatencyHighChat", False),
                        ("VLLMInterTokenLatencyHighBatch", False)}
    for (alert, fires), at in got.items():
        minute = int(at.removesuffix("m"))
        if fires:  # 5 minutes into the slow half: the whole `for: 5m` window over the threshold
            assert minute >= 15 + 5, (alert, at)
        elif alert != "VLLMInterTokenLatencyHighBatch":  # batch's 100 ms is never crossed: silent anywhere
            assert minute < 15, (alert, at)
    series = {s["series"] for s in test["tests"][0]["input_series"]}
    assert 'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="fp8-kv"}' in series
    assert promtool_test("fp8-kv", []) is None


@needs_promtool
def test_promtool_agrees_with_the_expectations_and_would_catch_a_wrong_one(tmp_path: Path):
    """The expectations (histogram_quantile re-implemented here) against Prometheus's own evaluation. The rules'
    annotations are added to each expected alert, as promtool compares them (see the xfail below)."""
    import subprocess

    raw = recorded_series("fp8-kv")
    kit = tmp_path / "kit"
    write_kit(kit, "fp8-kv", "vllm serve /ckpt --served-model-name fp8-kv --seed 0",
              {"settings": {"workloads": [{"name": "random"}]}, "capacity": {"load": 8}, "levels": sweep(8),
               "prometheus": {"raw": raw, "queries": queries("fp8-kv")}}, {"tensor_parallel": 1}, "promote")
    rules = {r["alert"]: r for r in yaml.safe_load((kit / "alerts.yaml").read_text())["groups"][0]["rules"]}
    test = yaml.safe_load((kit / "alerts.test.yaml").read_text())
    for case in test["tests"][0]["alert_rule_test"]:
        for alert in case["exp_alerts"]:
            alert["exp_annotations"] = rules[case["alertname"]]["annotations"]

    def promtool(t: dict[str, Any]) -> subprocess.CompletedProcess:
        (kit / "t.yaml").write_text(yaml.safe_dump(t, sort_keys=False, width=1 << 20))
        return subprocess.run(["promtool", "test", "rules", "t.yaml"], cwd=kit, capture_output=True, text=True,
                              check=False)

    ok = promtool(test)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fire = next(c for c in test["tests"][0]["alert_rule_test"] if c["exp_alerts"])
    fire["exp_alerts"] = []  # claim the page stays silent where the series say it fires
    assert promtool(test).returncode != 0


@needs_promtool
def test_the_kit_with_recorded_series_passes_its_own_promtool_test(tmp_path: Path):
    ctx, _ = make_run(tmp_path, {"fp8-kv": "promote", "fp8": "reject"},
                      benches={"fp8-kv": {"raw": recorded_series("fp8-kv")}})
    assert run_deploy(ctx.run_dir) == 0
    kit = ctx.run_dir / "deploy" / "fp8-kv"
    assert (kit / "alerts.test.yaml").is_file() and check_kit(kit) == []


def test_the_bench_records_the_raw_series_the_promtool_test_replays(tmp_path: Path):
    from evals.bench_stage import BenchStage

    class Prom:
        """Prometheus's range API over the series the servers exported: the bench asks for each histogram's
        buckets summed over ranks (`sum by (le, model_name) (...)`), anything else is one unnamed series."""

        scrape_interval_s = 1

        def query_range(self, q: str, start: float, end: float, step: float | None = None) -> list[dict[str, Any]]:
            summed = re.fullmatch(r"sum by \(le, model_name\) \(([\w:]+)\{[^}]*\}\)", q)
            if summed is None:
                return [{"metric": {}, "values": [[start, "1"], [end, "2"]]}]
            return [{"metric": {k: v for k, v in s["metric"].items() if k in ("le", "model_name")},
                     "values": [[start + i * (step or 1), f"{v:g}"] for i, v in enumerate(s["values"])]}
                    for s in recorded_series("fp8-kv") if s["metric"]["__name__"] == summed.group(1)]

    class Server:
        name = "fp8-kv"
        levels = [{"start": 100.0, "end": 130.0}]

    recorded = BenchStage._series(None, Prom(), Server())  # type: ignore[arg-type]
    kit = tmp_path / "kit"
    write_kit(kit, "fp8-kv", "vllm serve /ckpt --served-model-name fp8-kv", {
        "settings": {"workloads": [{"name": "random"}]}, "capacity": {"load": 8}, "levels": sweep(8),
        "prometheus": recorded}, {"tensor_parallel": 1}, "promote")
    assert (kit / "alerts.test.yaml").is_file()


def test_the_scaler_runs_the_queries_the_bench_measured_the_knee_with(tmp_path: Path):
    """One home for the PromQL: the ScaledObject's queries are the bench artifact's recorded ones (whatever
    they are), and a bench without them cannot give thresholds."""
    from qgcore.errors import ArtifactError

    recorded = queries("fp8") | {"waiting": 'sum(vllm:num_requests_waiting{model_name="fp8",x="y"})'}
    bench = {"settings": {"workloads": [{"name": "random"}]}, "capacity": {"load": 8}, "levels": sweep(8),
             "prometheus": {"queries": recorded}}
    objs = write_kit(tmp_path / "a", "fp8", "vllm serve /ckpt --served-model-name fp8", bench, {"tensor_parallel": 1},
                     "promote")
    trig = {t["name"]: t["metadata"]["query"] for t in objs["scaledobject"]["spec"]["triggers"]}
    assert trig == {"queue": recorded["waiting"], "kv-cache": recorded["kv_cache_usage"]}
    with pytest.raises(ArtifactError, match="no Prometheus queries"):
        write_kit(tmp_path / "b", "fp8", "vllm serve /ckpt", bench | {"prometheus": {}}, {"tensor_parallel": 1},
                  "promote")
