"""A real Prometheus (Debian's `prometheus` package) for the bench: started on loopback, it scrapes every vLLM
server the bench runs, and the report's queue-time and KV-occupancy curves come from PromQL over those
series: the same queries the deploy kit's autoscaler and alerts run.

Targets are file-discovered (`file_sd_configs`), so servers join and leave without a reload; each carries a
`variant` label. Everything lives in a temporary folder and is gone after `stop()`. Loopback only: the
server listens on 127.0.0.1 and scrapes only the addresses the bench gives it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from qgcore.errors import QuantgateError

SCRAPE_INTERVAL_S = 1


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """`with PrometheusServer() as prom: prom.add_target("fp8", "127.0.0.1:8000"); prom.query_range(...)`."""

    def __init__(self, binary: str | None = None, scrape_interval_s: int = SCRAPE_INTERVAL_S):
        self.binary = binary or prometheus_binary()
        if self.binary is None:
            raise QuantgateError("the bench's Prometheus needs Debian's `prometheus` package: `apt-get install "
                                 "prometheus` (make setup does, as root), or set prometheus: false in the bench YAML")
        self.scrape_interval_s = scrape_interval_s
        self.dir = Path(tempfile.mkdtemp(prefix="quantgate-prom-"))
        self.port = _free_port()
        self.targets: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_targets(self) -> None:
        groups = [{"targets": [addr], "labels": {"variant": name}} for name, addr in self.targets.items()]
        tmp = self.dir / "targets.json.tmp"
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.dir / "targets.json")

    def start(self) -> PrometheusServer:
        self._write_targets()
        (self.dir / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval_s}s\n"
            f"  evaluation_interval: {self.scrape_interval_s}s\n"
            "scrape_configs:\n"
            "  - job_name: vllm\n"
            "    metrics_path: /metrics\n"
            "    file_sd_configs:\n"
            f"      - files: ['{self.dir / 'targets.json'}']\n"
            "        refresh_interval: 1s\n")
        log = (self.dir / "prometheus.log").open("w")
        self.proc = subprocess.Popen([self.binary, f"--config.file={self.dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QuantgateError(f"Prometheus exited with {self.proc.returncode}: "
                                     f"{(self.dir / 'prometheus.log').read_text()[-300:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise QuantgateError("Prometheus not ready after 60 s")

    def add_target(self, variant: str, address: str) -> None:
        self.targets[variant] = address
        self._write_targets()

    def remove_target(self, variant: str) -> None:
        self.targets.pop(variant, None)
        self._write_targets()

    def wait_scraped(self, variant: str, timeout: float = 30.0) -> bool:
        """Until Prometheus has scraped the variant's server at least once (its `up` series is 1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.query(f'up{{variant="{variant}"}}')
            if got and float(got[0]["value"][1]) == 1.0:
                return True
            time.sleep(0.5)
        return False

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise QuantgateError(f"PromQL failed: {body.get('error')} ({params.get('query')})")
        return body["data"]["result"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = at
        return self._get("/api/v1/query", params)

    def query_range(self, promql: str, start: float, end: float, step: float | None = None) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", {"query": promql, "start": start, "end": end,
                                                  "step": step or self.scrape_interval_s})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The queries the report draws and the deploy kit's scaler and alerts run (one home: evals and reports both
# read them from the bench artifact, where they are recorded beside their results).
GAUGES = ("kv_cache_usage", "waiting", "running")  # instant values; the rest are rates over a window


def is_gauge(name: str) -> bool:
    return name in GAUGES


def queries(variant: str, window: str = "15s") -> dict[str, str]:
    sel = f'model_name="{variant}"'  # vLLM's own label (the served name): the same in the bench and in production
    return {
        "queue_time_p95_s": f"histogram_quantile(0.95, sum by (le) (rate(vllm:request_queue_time_seconds_bucket"
                            f"{{{sel}}}[{window}])))",
        "queue_time_mean_s": f"sum(rate(vllm:request_queue_time_seconds_sum{{{sel}}}[{window}])) / "
                             f"sum(rate(vllm:request_queue_time_seconds_count{{{sel}}}[{window}]))",
        "kv_cache_usage": f"avg(vllm:kv_cache_usage_perc{{{sel}}})",  # a utilization, averaged over replicas
        "waiting": f"sum(vllm:num_requests_waiting{{{sel}}})",
        "running": f"sum(vllm:num_requests_running{{{sel}}})",
        "ttft_p95_s": f"histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
                      f"{{{sel}}}[{window}])))",
        "itl_p95_s": f"histogram_quantile(0.95, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket"
                     f"{{{sel}}}[{window}])))",
    }
