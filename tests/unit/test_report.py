"""Gate and report from a run folder written by the project's own artifact writers (synthetic numbers, real
schemas): run.json through quantgate.context.record_run, manifests, eval.json with per-item TaskResults,
bench.json with the bench's own capacity/ratio helpers, divergence.json from qgcore.divergence.summarize.
No model, no server: the e2e tests cover real artifacts."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from evals.bench_stage import DEMO_CPU_CONFIG, add_need
from evals.perf import (
    SLO,
    Prices,
    break_even,
    capacity_of,
    capacity_summary,
    fit_table,
    max_sequences,
    meets_slo,
    ratio_interval,
)
from evals.prom import queries
from qgcore.artifacts import (
    BenchRun,
    CheckpointManifest,
    DivergenceRun,
    EvalRun,
    ModelRef,
    TaskResult,
    model_config_summary,
    quantization_summary,
)
from qgcore.device import Platform
from qgcore.divergence import TOPK_METHOD, summarize, topk_of
from qgcore.errors import EXIT_CONFIG, EXIT_GATE_REJECTED, EXIT_OK, ArtifactError, ConfigError, IntegrityError
from qgcore.hashing import content_key
from qgcore.integrity import record_files
from qgcore.quality import RecipeGate
from qgcore.run import RunContext
from qgcore.stats import compare
from quantgate.context import record_run
from quantgate.demo import DEMO_SIZING, demo_settings
from quantize.recipe import load_recipe
from quantize.schemes import SCHEMES
from reports import charts
from reports.data import VERDICT_SCHEMA_VERSION, build_report_data, read_verdict
from reports.gate import Evidence, anchor, decide
from reports.policy import load_policy
from reports.render import render
from reports.stage import run_gate, run_report

MODEL = ModelRef(model_id="tiny-llama", path="/models/tiny-llama", revision="sha256:0123abcd", slug="tiny-llama",
                 source="local")
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
          "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "max_position_embeddings": 2048, "vocab_size": 512}
SHAPES = {"q_proj": [128, 128], "k_proj": [128, 64], "down_proj": [256, 128]}
CPU = Platform("cpu", cpu="synthetic test CPU", source="test")
SIZES = {"bf16": 8000, "fp8": 4000, "gptq-4": 2000, "awq-4": 2000}  # bytes of the fake weights file
N_MC, N_PPL = 500, 650


@dataclass
class Plan:
    """How each variant of the synthetic run behaves."""

    demo: bool = False  # demo-sized calibration, eval and bench (quantgate.demo), as `make demo` records them
    absent: tuple[str, ...] = ("nvfp4",)  # declared in run.json, never quantized (counts in the family)


# ---- the run folder, through the artifact writers ----------------------------------------------------------

def _quantize(run: Path, name: str, plan: Plan) -> CheckpointManifest:
    """A checkpoint folder and its manifest, as quantize.run writes them (config from the scheme's own plan)."""
    recipe = load_recipe(name)
    ckpt = run / name / "checkpoint"
    ckpt.mkdir(parents=True)
    config = dict(CONFIG)
    planned = SCHEMES[recipe.quant.scheme].summary(recipe)
    if planned.get("quantized"):
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": planned["format"],
                                         "config_groups": {"group_0": {"weights": planned["weights"],
                                                                       "input_activations":
                                                                           planned["input_activations"]}},
                                         "ignore": list(recipe.quant.ignore)}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "model.safetensors").write_bytes(b"\0" * SIZES[name])
    sizing = DEMO_SIZING if plan.demo and recipe.calibration is not None else None
    m = CheckpointManifest(
        content_key=content_key([MODEL.revision, recipe.content_hash(), sizing]), model=MODEL, recipe=name,
        family=recipe.family, recipe_hash=recipe.content_hash(), recipe_spec=recipe.model_dump(mode="json"),
        calibration=recipe.calibration.model_dump(mode="json") if recipe.calibration else None,
        calibration_data="python-stdlib-docstrings/calibration@test" if recipe.calibration else None,
        sizing=sizing, versions={"llmcompressor": "test", "torch": "test"}, device={"device": "cpu"},
        wall_seconds=1.5, peak_memory={"rss_bytes": 1 << 30, "kind": "host RSS of the quantize process"},
        bytes_on_disk=sum(p.stat().st_size for p in ckpt.iterdir()), checkpoint_dir="checkpoint",
        files=record_files(ckpt), quantization=quantization_summary(config), linear_shapes=SHAPES,
        architecture=model_config_summary(config), serve=recipe.serve.model_dump(mode="json"),
        created_at="2026-01-01T00:00:00+00:00")
    m.write(run / name / "manifest.json")
    return m


def _mc_items(flips: int) -> dict[str, list[float]]:
    """The reference right on 300 of 500 4-way items; the variant loses `flips` of those."""
    return {f"{i}": [float(i < 300 and i >= flips), 1.0] for i in range(N_MC)}


def _ppl_items(shift: float) -> dict[str, list[float]]:
    """Bits and bytes per document: the reference near 1.1 bits/byte, the variant `shift` bits/byte worse."""
    docs, noise = random.Random(7), random.Random(8)
    out = {}
    for i in range(N_PPL):
        nbytes, bpb = docs.randint(800, 1500), 1.1 + docs.gauss(0, 0.08)
        if shift:
            bpb += shift + noise.gauss(0, 0.004)
        out[str(i)] = [bpb * nbytes, float(nbytes)]
    return out


def _tasks(name: str, flips: int, shift: float) -> dict[str, TaskResult]:
    mc, ppl = _mc_items(flips), _ppl_items(shift)
    examples = {d: {"question": f"question {d}?", "target": "A", "choice": "A" if v[0] else "B", "margin": 0.1}
                for d, v in mc.items()}
    acc = sum(v[0] for v in mc.values()) / N_MC
    return {
        "mc": TaskResult(key=f"{name}-mc", task="mc", status="scored", engine="vllm", metric="acc,none",
                         higher_is_better=True, binary=True, value=acc, stderr=(acc * (1 - acc) / N_MC) ** 0.5,
                         n_items=N_MC, items=mc, chance=0.25, examples=examples, source="synthetic MC",
                         wall_seconds=2.0),
        "ppl": TaskResult(key=f"{name}-ppl", task="ppl", status="scored", engine="vllm", metric="bits_per_byte,none",
                          higher_is_better=False, binary=False,
                          value=sum(v[0] for v in ppl.values()) / sum(v[1] for v in ppl.values()),
                          n_items=N_PPL, items=ppl, source="synthetic documents", wall_seconds=3.0),
    }


def _eval(run: Path, m: CheckpointManifest, plan: Plan, *, flips: int = 0, shift: float = 0.0,
          failed: str | None = None) -> None:
    prov = {"versions": {"lm_eval": "test", "vllm": "test"}, "limit": None, "seed": 1234, "flags": ["--dtype", "auto"]}
    if plan.demo:
        demo = demo_settings(tasks=["mc", "ppl"], limit=None, divergence_docs=None, bench_config=None, cpu=True)
        prov["demo"] = demo.record()
    tasks = {} if failed else _tasks(m.recipe, flips, shift)
    EvalRun(variant=m.recipe, family=m.family, status="failed:start" if failed else "served", reason=failed,
            engine="vllm", platform=CPU.to_dict(), manifest_key=m.content_key, tasks=tasks,
            server={"startup_seconds": 4.0}, provenance=prov, wall_seconds=30.0).write(run / m.recipe / "eval.json")


def _divergence(run: Path, m: CheckpointManifest, noise: float) -> None:
    """Top-20 log-probs of three 700-token documents (two depth buckets) through the project's summarizer."""
    rng = np.random.default_rng(3)
    ref, var = [], []
    for _ in range(3):
        logits = rng.normal(0, 3, size=(700, 64))
        for out, x in ((ref, logits), (var, logits + rng.normal(0, noise, size=logits.shape))):
            lp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
            out.append(topk_of(lp, 20))
    stats = summarize(ref, var, 701)
    DivergenceRun(variant=m.recipe, status="measured", engine="vllm", reference_engine="vllm", key=f"{m.recipe}-div",
                  k=20, method=TOPK_METHOD, source="synthetic logits", n_docs=3, doc_tokens=700, max_model_len=2048,
                  overall=stats["overall"], by_depth=stats["by_depth"],
                  doc_kl_mean=stats["doc_kl_mean"]).write(run / m.recipe / "divergence.json")


def _bench(run: Path, m: CheckpointManifest, plan: Plan, tps: float, ref_tps: float | None) -> None:
    """A concurrency sweep 1..8 (latency grows with load), capacity and ratio by evals.perf's own helpers."""
    slo = SLO()
    levels, history = [], []
    for load in (1, 2, 4, 8):
        scale = min(load, 4) / 4
        lv = {"workload": "random", "load": load, "load_kind": "concurrency", "concurrency": load, "phase": "sweep",
              "warmup": False, "repeat": None, "output_throughput": tps * scale, "request_throughput": tps * scale / 64,
              "p50_ttft_ms": 200.0 * load, "p95_ttft_ms": 400.0 * load, "p99_ttft_ms": 500.0 * load,
              "p50_itl_ms": 8.0 * load, "p95_itl_ms": 9.0 * load, "p99_itl_ms": 11.0 * load,
              "p50_e2el_ms": 700.0, "p95_e2el_ms": 900.0, "p99_e2el_ms": 990.0, "failed": 0,
              "metrics": {"kv_cache_usage_perc": {"peak": 0.1 * load}, "num_requests_waiting": {"peak": 0},
                          "request_queue_time_seconds": {"mean": 0.01}}, "start": 0.0, "end": 10.0}
        lv["meets_slo"] = meets_slo(lv, slo)
        history.append((load, lv["meets_slo"]))
        levels.append(lv)
    cap = capacity_of(history)
    repeats = [next(lv for lv in levels if lv["load"] == cap) | {"phase": "repeat", "repeat": i + 1,
                                                                   "output_throughput": tps * (1 + d)}
               for i, d in enumerate((-0.01, 0.0, 0.01))]
    levels += repeats
    capacity = capacity_summary(cap, repeats, price_per_hour=0.10, gpus=1, level=0.95)
    ratio = None
    if ref_tps is not None:
        ratio = ratio_interval([(ref_tps * (1 + d), tps * (1 + d / 2)) for d in (-0.02, 0.0, 0.01, 0.02)], 0.95)
    mem = {"weights_bytes": m.bytes_on_disk, "kv_cache_bytes": 3 * m.bytes_on_disk, "kv_cache_tokens": 9000,
           "server_rss_bytes_peak": 5 * m.bytes_on_disk, "kind": "host RSS",
           "sources": {"weights_bytes": "vLLM start-up log", "kv_cache_bytes": "vLLM start-up log"}}
    mem = add_need(mem, m, m.serve.get("kv_cache_dtype", "auto"), 2048, capacity.get("load"))
    mem |= {"context_len": 2048, "max_concurrent_sequences_at_context_len": max_sequences(9000, 2048)}
    config = DEMO_CPU_CONFIG.name if plan.demo else "bench.cpu.yaml"
    # what the bench's Prometheus recorded (the evals.prom queries, one sample a second over 40 s) and the economics
    # evals.perf computes from the capacity
    qs = queries(m.recipe)
    series = {"queue_time_p95_s": [[100.0 + t, 0.01 * t] for t in range(40)],
              "kv_cache_usage": [[100.0 + t, min(t / 40, 1.0)] for t in range(40)],
              "waiting": [[100.0 + t, float(t > 30)] for t in range(40)]}
    economics = {"break_even": break_even(capacity.get("usd_per_1m_output_tokens"), 1, 0.10, Prices(),
                                          capacity.get("output_tokens_per_s"), 2.0),
                 "fit": fit_table(mem.get("weights_bytes"), 4096, 2048, capacity.get("load"), 1)}
    BenchRun(variant=m.recipe, status="served", key=f"{m.recipe}-bench", tool={"name": "vllm bench serve",
                                                                                 "version": "test"},
             settings={"input_len": 128, "output_len": 64, "seed": 0, "price_key": "cpu", "config": config,
                       "price_per_hour": 0.10, "economics": economics},
             levels=levels, slo=slo.model_dump(), capacity=capacity, throughput_vs_reference=ratio, memory=mem,
             workloads={"random": {"capacity_load": capacity.get("load"), "stopped": "SLO missed at concurrency 8",
                                   "output_tokens_per_s": capacity.get("output_tokens_per_s")}},
             prometheus={"queries": qs, "series": series, "scrape_interval_s": 1.0, "prometheus": "test"},
             wall_seconds=40.0).write(run / m.recipe / "bench.json")


def make_run(root: Path, plan: Plan | None = None) -> Path:
    """bf16 (reference), fp8 (same answers, faster: promote), gptq-4 (loses 12 points: reject), awq-4 (its server
    never started: reject), and nvfp4 declared but never built; the family-wise correction counts all four."""
    plan = plan or Plan()
    run = root / "runs" / MODEL.slug
    ms = {n: _quantize(run, n, plan) for n in ("bf16", "fp8", "gptq-4", "awq-4")}
    ctx = RunContext(run_dir=run, model=None, platform=CPU, target=CPU, cache_dir=root / "cache",
                     serve_python=sys.executable)
    record_run(ctx, declared=["bf16", "fp8", "gptq-4", "awq-4", *plan.absent],
               families={n: load_recipe(n).family for n in plan.absent})
    _eval(run, ms["bf16"], plan)
    _eval(run, ms["fp8"], plan, shift=0.002)
    _eval(run, ms["gptq-4"], plan, flips=60, shift=0.01)
    _eval(run, ms["awq-4"], plan, failed="vLLM exited with code 1 during start-up")
    _bench(run, ms["bf16"], plan, 100.0, None)
    _bench(run, ms["fp8"], plan, 130.0, 100.0)
    _bench(run, ms["gptq-4"], plan, 160.0, 100.0)
    BenchRun(variant="awq-4", status="skipped:unservable", reason="not benched: eval could not serve it",
             key="awq-4-bench", tool={"name": "vllm bench serve", "version": "test"}, settings={"config": "x"},
             levels=[], slo=SLO().model_dump(), memory={}).write(run / "awq-4" / "bench.json")
    _divergence(run, ms["fp8"], 0.05)
    _divergence(run, ms["gptq-4"], 0.4)
    DivergenceRun(variant="awq-4", status="skipped:unserved", reason="no top-k log-probs for awq-4: awq-4 was not "
                  "served (failed:start)", engine="vllm", reference_engine="vllm", key="awq-4-div", k=20,
                  method=TOPK_METHOD, source="synthetic logits").write(run / "awq-4" / "divergence.json")
    return run


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full run, gated and reported once (read-only for the tests that use it)."""
    run = make_run(tmp_path_factory.mktemp("full"))
    assert run_gate(run, policy_path=None, require=None, junit=None) == EXIT_OK
    assert run_report(run) == EXIT_OK
    return run


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A gated run of its own, for tests that change it."""
    run = make_run(tmp_path)
    assert run_gate(run, policy_path=None, require=None, junit=None) == EXIT_OK
    return run


class Page(HTMLParser):
    """Every element's id, every link and source attribute, each svg's text, and the verdict rows' links."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []
        self.evidence: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src", "xlink:href", "action", "srcset", "poster", "data"):
            if a.get(key) is not None:
                self.urls.append((tag, key, a[key] or ""))
        if tag == "a" and "evidence" in (a.get("class") or "").split():
            self.evidence.append(a.get("href") or "")


# ---- the gate ------------------------------------------------------------------------------------------------

def test_gate_writes_the_verdict_atomically_with_junit_and_the_expected_decisions(gated: Path):
    verdict = json.loads((gated / "verdict.json").read_text())
    assert verdict["schema_version"] == VERDICT_SCHEMA_VERSION == 3
    assert not list(gated.glob("*.tmp"))  # written through a temporary file, renamed into place
    fam = verdict["family"]
    assert (fam["k"], fam["absent"], fam["correction"]) == (4, ["nvfp4"], "holm")  # declared, not present
    assert {v: d["verdict"] for v, d in verdict["variants"].items()} == \
        {"fp8": "promote", "gptq-4": "reject", "awq-4": "reject"}
    assert verdict["recommended"] == "fp8" and verdict["passed"] is True
    assert "--served-model-name fp8" in verdict["deploy"]["command"]
    gptq = {c["name"]: c["outcome"] for c in verdict["variants"]["gptq-4"]["checks"]}
    assert gptq["quality:mc"] == "fail"
    awq = verdict["variants"]["awq-4"]["checks"]
    assert awq[0]["name"] == "quality:serve" and "vLLM exited with code 1" in awq[0]["reason"]
    suite = ET.parse(gated / "verdict.junit.xml").getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert cases[("quantgate.gptq-4", "quality:mc")].find("failure") is not None
    assert cases[("quantgate.fp8", "quality:mc")].find("failure") is None
    assert int(suite.get("tests")) == sum(len(d["checks"]) for d in verdict["variants"].values())


def _evidence_from_artifacts(run: Path, policy, k: int) -> dict[str, Evidence]:
    """The gate's inputs assembled here from the artifacts as written, through the comparison engine: the
    margins, floors and levels the policy gives each variant's family, over the k declared variants."""
    q = policy.quality
    levels = q.levels(k)
    ref_eval = EvalRun.read(run / "bf16" / "eval.json").model_dump(mode="json")
    ref_bench = BenchRun.read(run / "bf16" / "bench.json").model_dump(mode="json")
    out = {}
    for name in ("awq-4", "fp8", "gptq-4"):
        m = CheckpointManifest.read(run / name / "manifest.json")
        ev = EvalRun.read(run / name / "eval.json").model_dump(mode="json")
        comps = {}
        for task, res in ev["tasks"].items():
            ref = ref_eval["tasks"][task]
            comps[task] = compare({i: tuple(v) for i, v in ref["items"].items()},
                                  {i: tuple(v) for i, v in res["items"].items()}, metric=res["metric"],
                                  higher_is_better=res["higher_is_better"], binary=res["binary"], levels=levels,
                                  margin=q.margin_for(m.family, res["metric"]),
                                  floor=q.floor_for(m.family) if res["binary"] else None, chance=ref["chance"],
                                  n_boot=q.n_boot, seed=0).to_dict()
        div = run / name / "divergence.json"
        out[name] = Evidence(name, m.family, "bf16", RecipeGate(), ev, ref_eval, comps,
                             BenchRun.read(run / name / "bench.json").model_dump(mode="json"), ref_bench,
                             DivergenceRun.read(div).model_dump(mode="json") if div.is_file() else None,
                             m.bytes_on_disk)
    return out


def test_the_verdict_is_what_decide_says_for_these_artifacts(gated: Path):
    verdict = json.loads((gated / "verdict.json").read_text())
    policy = load_policy()
    mine = {d.variant: d for d in decide(_evidence_from_artifacts(gated, policy, k=4), policy, k=4)}
    assert set(mine) == set(verdict["variants"])
    for name, d in mine.items():
        got = verdict["variants"][name]
        assert (got["verdict"], got["level"], got["p_value"]) == (d.verdict, d.level, d.p_value), name
        assert [(c["name"], c["outcome"]) for c in got["checks"]] == [(c.name, c.outcome) for c in d.checks], name
    # the levels are Holm's over the four declared variants (nvfp4 absent counts), not over the three present
    assert mine["fp8"].level == pytest.approx(0.05 / 4)
    assert verdict["family"]["levels"] == {n: d.level for n, d in mine.items()}


def test_gate_exit_codes_follow_the_verdict(fresh: Path, tmp_path: Path):
    before = (fresh / "verdict.json").read_bytes()
    with pytest.raises(ConfigError, match="--require nope: no such variant") as err:
        run_gate(fresh, policy_path=None, require="nope", junit=None)
    assert err.value.exit_code == EXIT_CONFIG and (fresh / "verdict.json").read_bytes() == before
    assert run_gate(fresh, policy_path=None, require="gptq-4", junit=None) == EXIT_GATE_REJECTED
    assert run_gate(fresh, policy_path=None, require="fp8", junit=tmp_path / "j.xml") == EXIT_OK
    assert (tmp_path / "j.xml").is_file()
    shutil.rmtree(fresh / "fp8")
    assert run_gate(fresh, policy_path=None, require=None, junit=None) == EXIT_GATE_REJECTED
    assert json.loads((fresh / "verdict.json").read_text())["recommended"] is None


# ---- the report ------------------------------------------------------------------------------------------------

def test_the_report_is_one_self_contained_file(gated: Path):
    html = (gated / "report.html").read_text()
    page = Page(html)
    assert page.urls, "the report has links"
    outside = [u for u in page.urls if not u[2].startswith("#")]
    assert not outside, f"only in-page links and no sources: {outside[:3]}"
    assert not {"img", "script", "link", "iframe", "object", "embed"} & set(page.tags)
    style = "".join(re.findall(r"<style>(.*?)</style>", html, re.S))
    assert style and "url(" not in style and "@import" not in style
    assert not re.search(r"\bhttps?://", html), "no URL anywhere, not even as text"
    assert page.tags.count("svg") >= 8 and "Gate: PASSED" in html


def test_every_registered_chart_is_drawn_inline(gated: Path):
    data = build_report_data(gated)
    html = (gated / "report.html").read_text()
    assert charts.CHARTS
    for chart in charts.CHARTS.values():
        drawn = chart.build(data)
        assert drawn, chart.name
        for section, svg in drawn.items():
            assert svg.startswith("<svg") and svg.count("<svg") == svg.count("</svg>"), (chart.name, section, svg[:80])
            assert svg in html, f"chart {chart.name} (section {section}) is not in the page"
            assert re.search(r"<(path|rect|circle) ", svg), f"chart {chart.name} drew nothing"


def test_every_verdict_row_links_to_evidence_that_exists(gated: Path):
    verdict = json.loads((gated / "verdict.json").read_text())
    page = Page((gated / "report.html").read_text())
    expected = [anchor(c["name"], name) for name, d in verdict["variants"].items() for c in d["checks"]]
    assert page.evidence == expected  # one link per check, in order, where reports.gate.anchor says
    missing = sorted({h for h in page.evidence if h[1:] not in page.ids})
    assert not missing, f"links to nowhere: {missing}"
    assert {"#task-mc", "#task-ppl", "#bench-fp8", "#bench-awq-4", "#quality"} <= set(page.evidence)


def test_a_task_the_reference_could_not_score_still_has_the_section_the_verdict_links_to(fresh: Path):
    ev = EvalRun.read(fresh / "bf16" / "eval.json")
    ev.model_copy(update={"status": "failed:start", "reason": "vLLM exited with code 1", "tasks": {}}) \
        .write(fresh / "bf16" / "eval.json")
    run_gate(fresh, policy_path=None, require=None, junit=None)
    page = Page(render(build_report_data(fresh)))
    assert "#task-mc" in page.evidence  # fp8's mc check: "bf16 has no score to compare with"
    assert not sorted({h for h in page.evidence if h[1:] not in page.ids})


def test_flips_and_the_failed_variant_are_shown(gated: Path):
    html = (gated / "report.html").read_text()
    assert "Most confident flips for gptq-4" in html and "right→wrong" in html
    assert "Most confident flips for fp8" not in html  # identical answers: nothing flipped
    assert "vLLM exited with code 1 during start-up" in html


@pytest.mark.parametrize("change", ["edit run.json", "edit the reference eval", "edit a bench", "delete a divergence",
                                    "add an emulated reference eval", "rewrite a manifest"])
def test_an_input_changed_after_gating_is_refused(fresh: Path, change: str):
    verdict, digest = read_verdict(fresh)  # unchanged: accepted, with the hash of the file as written
    assert digest == hashlib.sha256((fresh / "verdict.json").read_bytes()).hexdigest()
    (fresh / "run.json").touch()  # a new mtime with the same bytes changes nothing
    read_verdict(fresh)
    if change == "edit run.json":
        path = fresh / "run.json"
        path.write_text(path.read_text().replace('"nvfp4"', '"nvfp4", "fp8-kv"', 1))
    elif change == "edit the reference eval":
        ev = EvalRun.read(fresh / "bf16" / "eval.json")
        ev.model_copy(update={"wall_seconds": 31.0}).write(fresh / "bf16" / "eval.json")
    elif change == "edit a bench":
        path = fresh / "fp8" / "bench.json"
        path.write_text(path.read_text() + "\n")
    elif change == "delete a divergence":
        (fresh / "gptq-4" / "divergence.json").unlink()
    elif change == "add an emulated reference eval":
        shutil.copy(fresh / "bf16" / "eval.json", fresh / "bf16" / "eval-emulated.json")
    else:
        m = CheckpointManifest.read(fresh / "gptq-4" / "manifest.json")
        m.model_copy(update={"wall_seconds": 9.0}).write(fresh / "gptq-4" / "manifest.json")
    with pytest.raises(ArtifactError, match="was decided on other artifacts .* changed since"):
        read_verdict(fresh)
    with pytest.raises(ArtifactError):
        run_report(fresh)
    assert not (fresh / "report.html").exists()
    assert run_gate(fresh, policy_path=None, require=None, junit=None) in (EXIT_OK, EXIT_GATE_REJECTED)
    read_verdict(fresh)  # regated: accepted again


def test_a_checkpoint_edited_after_gating_stops_the_report(fresh: Path):
    with (fresh / "fp8" / "checkpoint" / "model.safetensors").open("ab") as fh:
        fh.write(b"\1")
    with pytest.raises(IntegrityError, match="fp8"):
        build_report_data(fresh)


def test_a_verdict_of_another_schema_is_refused(fresh: Path):
    path = fresh / "verdict.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"schema_version": 2}))
    with pytest.raises(ArtifactError, match="schema 2, expected 3"):
        read_verdict(fresh)


def test_the_demo_banner_is_shown_only_for_demo_artifacts(gated: Path, tmp_path: Path):
    full = build_report_data(gated)
    assert full["demo"] is None and 'id="demo-sizing"' not in (gated / "report.html").read_text()
    demo = make_run(tmp_path / "demo", Plan(demo=True))
    run_gate(demo, policy_path=None, require=None, junit=None)
    assert run_report(demo) == EXIT_OK
    html = (demo / "report.html").read_text()
    banner = re.search(r'<p class="inconclusive" id="demo-sizing">(.*?)</p>', html, re.S)
    assert banner, "a demo run says so"
    text = banner.group(1)
    assert f"{DEMO_SIZING['num_samples']} samples x {DEMO_SIZING['seq_len']} tokens" in text
    assert f"{DEMO_SIZING['grid_points']} grid points" in text
    assert "mc (" in text and "ppl (" in text and DEMO_CPU_CONFIG.name in text


def test_a_full_quantize_with_a_demo_eval_is_labelled_partly_demo(tmp_path: Path):
    run = make_run(tmp_path, Plan(demo=True))
    for name in ("gptq-4", "awq-4"):  # re-quantized as the recipes say: no sizing recorded
        m = CheckpointManifest.read(run / name / "manifest.json")
        m.model_copy(update={"sizing": None}).write(run / name / "manifest.json")
    run_gate(run, policy_path=None, require=None, junit=None)
    note = build_report_data(run)["demo"]["note"]
    assert "tasks mc (" in note and "grid points" not in note


def test_report_shows_where_the_time_went(fresh: Path):
    (fresh / "timings.json").write_text(json.dumps({"stages_seconds": {"quantize": 12.5, "eval": 300.0,
                                                                         "total": 312.5}, "exit_codes": {}}))
    data = build_report_data(fresh)  # timings.json is not a gate input: the verdict stands
    assert [r["variant"] for r in data["timings"]["variants"]] == ["bf16", "awq-4", "fp8", "gptq-4"]
    assert data["timings"]["variants"][2]["eval_scoring_seconds"] == 5.0  # mc 2.0 s + ppl 3.0 s
    html = render(data)
    assert 'id="stage-timings"' in html and "300.0 s" in html


# ---- in a browser ----------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# headless and offline: every host name fails to resolve; the net log still records what a page asked for
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-quic",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", "--force-device-scale-factor=1"]
# JavaScript off for pages, as a content setting of the profile (the --blink-settings switch also stops
# --dump-dom and --screenshot, which evaluate through DevTools)
NO_JS = {"profile": {"default_content_setting_values": {"javascript": 2}}}


def _chromium(page: Path, work: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run Chromium on `page` with a fresh script-less profile; its output and every URL the page requested."""
    profile = work / "profile"
    (profile / "Default").mkdir(parents=True)
    (profile / "Default" / "Preferences").write_text(json.dumps(NO_JS))
    netlog = work / "net.json"
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--log-net-log={netlog}", *args,
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=False)
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    asked = [e["params"]["url"] for e in log["events"] if e["type"] == start_job
             and "site=file://" in e["params"].get("site_for_cookies", "")]  # the page's, not the browser's own
    return out, [u for u in asked if not u.startswith("file:")]


def _colour_pixels(png: Path, rgb: str) -> int:
    from PIL import Image

    want = tuple(int(rgb[i:i + 2], 16) for i in (1, 3, 5))
    img = Image.open(png).convert("RGB")
    return sum(n for n, c in img.getcolors(img.width * img.height) if c == want)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make chromium` installs it)")
def test_report_renders_offline_in_headless_chromium_without_javascript(gated: Path, tmp_path: Path):
    """Chromium opens the file with scripts off and no network: the page asks for nothing, every inline chart
    survives parsing, and the verdict badges are painted in their colours."""
    pytest.importorskip("PIL")
    control = tmp_path / "control.html"  # the same checks catch a page that fetches or scripts
    control.write_text('<html><body><p id="x">static</p><img src="https://example.com/logo.png">'
                       '<script>document.getElementById("x").textContent = "scripted";</script></body></html>')
    out, asked = _chromium(control, tmp_path / "control", "--dump-dom")
    assert asked == ["https://example.com/logo.png"], asked
    assert '<p id="x">static</p>' in out.stdout, "JavaScript ran: the profile did not turn it off"

    report = gated / "report.html"
    html = report.read_text()
    dom, asked = _chromium(report, tmp_path / "dom", "--dump-dom")
    assert dom.returncode == 0 and not asked, (asked, dom.stderr[-1500:])
    assert "Gate: PASSED" in dom.stdout and "Recommended variant" in dom.stdout
    assert dom.stdout.count("<svg") == html.count("<svg") >= 8  # every inline chart parsed, none dropped
    labels = set(re.findall(r'data-chart="([^"]+)"', dom.stdout))
    assert {"forest plot mc", "forest plot ppl"} <= labels
    assert any(label.startswith("ITL p95 ms vs") for label in labels)

    shot = tmp_path / "report.png"
    _chromium(report, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file(), "no screenshot"
    for verdict in ("promote", "reject"):  # badges, outcome text and chart marks share these colours
        assert _colour_pixels(shot, charts.VERDICT_COLORS[verdict]) > 200, f"nothing painted in {verdict}'s colour"


def test_the_bench_section_shows_capacity_economics_and_the_prometheus_queries(gated: Path):
    """Every number names its source: the break-even with the playbook's rule and the price it used, the fit
    table labelled memory only, and the PromQL the curves (and the deploy kit's scaler) come from."""
    html = (gated / "report.html").read_text()
    bench = BenchRun.read(gated / "fp8" / "bench.json")
    be = bench.settings["economics"]["break_even"]
    assert "Self-hosting break-even (API spend &gt; GPU spend + 0.5 SRE)" in html
    if be.get("monthly_output_tokens"):
        assert f"{be['monthly_output_tokens'] / 1e6:.0f}M output tokens a month" in html
    assert "memory only, not measured on it" in html and "H100" in html
    assert bench.prometheus["queries"]["kv_cache_usage"].replace('"', "&#34;") in html  # jinja escaping
    assert 'id="throughput"' in html and "SLO missed at concurrency 8" in html


def test_a_prometheus_level_without_samples_is_a_gap_not_a_crash():
    """PromQL over a window with no samples is NaN, recorded as None: the chart leaves it out."""
    from reports.charts import _line

    assert _line({"q": [[10.0, None], [11.0, 0.5]]}, "q", "queue", 10.0)["points"] == [(1.0, 0.5)]
