"""Peak resident memory of a process tree, sampled in a thread (psutil).

Used for the quantize stage (this process) and for the vLLM server tree during eval/bench. On CPU
this is host RSS, and it is always labelled as such: never called VRAM.
"""

from __future__ import annotations

import threading

import psutil


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakRSS:
    """`with PeakRSS(pid) as m: ...; m.peak_bytes` — samples every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak_bytes = 0
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss(self.pid)
            self._samples.append(rss)
            self.peak_bytes = max(self.peak_bytes, rss)
            self._stop.wait(self.interval)

    @property
    def mean_bytes(self) -> int:
        return int(sum(self._samples) / len(self._samples)) if self._samples else 0

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.pid))

