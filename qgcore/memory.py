"""Peak memory of a process tree, sampled in a thread: host RSS (psutil) or the tree's own GPU memory (NVML).

Used for the quantize stage (this process) and for the vLLM server tree during eval/bench. Host RSS is
always labelled as such, never called VRAM. GPU memory is NVML's per-process accounting
(nvmlDeviceGetComputeRunningProcesses) summed over the server's process tree, never the whole device's
used memory: vLLM preallocates most of the card, so whole-device numbers are the same for every variant.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil


def tree_pids(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            total += psutil.Process(p).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_gpu_bytes(pid: int) -> int | None:
    """GPU memory used by `pid` and its descendants on every visible device (NVML per-process accounting).

    None when NVML is unavailable (no driver, no nvidia-ml-py); 0 when the tree holds no CUDA context.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no device: NVML has nothing to say
        return None
    pids = tree_pids(pid)
    total = 0
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
    finally:
        pynvml.nvmlShutdown()
    return total


class _Peak:
    """Samples `measure(pid)` every `interval` seconds in a thread; keeps the peak and the mean."""

    def __init__(self, pid: int, measure: Callable[[int], int | None], interval: float):
        self.pid, self.measure, self.interval = pid, measure, interval
        self.peak_bytes: int | None = None
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        value = self.measure(self.pid)
        if value is not None:
            self._samples.append(value)
            self.peak_bytes = max(self.peak_bytes or 0, value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    @property
    def mean_bytes(self) -> int | None:
        return int(sum(self._samples) / len(self._samples)) if self._samples else None

    @property
    def samples(self) -> int:
        return len(self._samples)

    def __enter__(self):  # noqa: ANN204 - returns self (a subclass)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


class PeakRSS(_Peak):
    """`with PeakRSS(pid) as m: ...; m.peak_bytes`: host resident memory of the process tree."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(pid, tree_rss, interval)


class PeakGPU(_Peak):
    """`with PeakGPU(pid) as m: ...; m.peak_bytes`: the process tree's own GPU memory (None without NVML)."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(pid, tree_gpu_bytes, interval)
