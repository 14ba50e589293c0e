"""What else ran on the machine while a cell measured: the load average, the CPU time of
every process outside the cell's own process tree, and on its GPUs the other processes and
their memory. A benchmark on a shared machine measures its neighbours too; this block is how
the summary can tell (`summary.cotenant_flag`)."""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import psutil

# Other processes' CPU time above this share of the machine's CPUs (summed over the window)
# marks a cell as measured under outside load. Half a core of a 2-core machine: enough to
# take a core from a 2-thread decode for a quarter of the window.
CPU_SHARE_THRESHOLD = 0.25


def _busy_s() -> float:
    """Seconds every CPU of the machine spent busy since boot (psutil.cpu_times: all but idle
    and I/O wait)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_s(process: psutil.Process) -> float:
    """CPU seconds of this process and its live children (vLLM's engine core is one)."""
    total = 0.0
    for p in (process, *process.children(recursive=True)):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:  # a child that ended meanwhile
            continue
    return total


class CotenantWatch:
    """Snapshots at the window's begin and end. `gpus`: the power monitor's NVML GPUs (their
    `nvml` and `handle`), or None with `gpu_reason` saying why they cannot be asked."""

    def __init__(self, gpus: Sequence | None = None, gpu_reason: str | None = None,
                 busy: Callable[[], float] = _busy_s, own: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.perf_counter, cpus: int | None = None,
                 loadavg: Callable[[], tuple] = os.getloadavg, pid: int | None = None):
        self.gpus, self.gpu_reason = gpus, gpu_reason
        self._busy, self._clock, self._loadavg = busy, clock, loadavg
        process = psutil.Process(pid)
        self._own = own or (lambda: _own_s(process))
        self._tree = lambda: {process.pid, *(c.pid for c in process.children(recursive=True))}
        self.cpus = cpus or psutil.cpu_count() or 1
        self._begin: tuple | None = None
        self._report: dict | None = None

    def begin(self) -> None:
        self._begin = (self._clock(), self._busy(), self._own(), self._loadavg()[0])

    def end(self) -> None:
        t0, busy0, own0, load0 = self._begin
        window, busy, own = self._clock() - t0, self._busy() - busy0, self._own() - own0
        other = max(busy - own, 0.0)
        self._report = {
            "available": True, "window_s": window, "cpus": self.cpus,
            "load_average_1m": [load0, self._loadavg()[0]],
            "own_cpu_s": own, "other_cpu_s": other,
            "other_cpu_share": other / (window * self.cpus) if window > 0 else None,
            "gpu_processes": self._gpu_processes(),
        }
        if self._report["gpu_processes"] is None:
            self._report["gpu_reason"] = self.gpu_reason or "no GPU used"

    def _gpu_processes(self) -> list[dict] | None:
        """Compute processes on the cell's GPUs that are not in its process tree."""
        if not self.gpus:
            return None
        ours, found = self._tree(), []
        for gpu in self.gpus:
            try:
                running = gpu.nvml.nvmlDeviceGetComputeRunningProcesses(gpu.handle)
            except gpu.nvml.NVMLError as exc:
                self.gpu_reason = f"NVML: {exc}"
                return None
            found += [{"gpu": gpu.index, "pid": p.pid, "used_memory_mb": (p.usedGpuMemory or 0) / 2**20}
                      for p in running if p.pid not in ours]
        return found

    def report(self) -> dict:
        if self._report is None:
            return {"available": False, "reason": "the cell did not reach the end of its measured window"}
        return self._report


def flag(block: dict | None, threshold: float = CPU_SHARE_THRESHOLD) -> str | None:
    """The summary's words for a window measured under outside load, or None."""
    if not block or not block.get("available"):
        return None
    words = []
    share = block.get("other_cpu_share")
    if share is not None and share > threshold:
        words.append(f"outside load: other processes used {share:.0%} of {block['cpus']} CPUs")
    gpu = block.get("gpu_processes") or []
    if gpu:
        words.append(f"{len(gpu)} other process(es) on its GPUs ({sum(p['used_memory_mb'] for p in gpu):.0f} MB)")
    return "; ".join(words) or None
