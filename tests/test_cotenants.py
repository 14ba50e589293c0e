"""The co-tenant watch on injected clocks, CPU counters and a fake NVML."""

import pynvml
import pytest

from specdec.job.cotenants import CotenantWatch, flag


class Counter:
    """Returns the given values one call after another."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self):
        return self.values.pop(0)


def test_other_processes_cpu_time_is_the_machines_less_the_cells():
    # a 10 s window on 2 CPUs: the machine was busy 16 s, the cell's own tree 11 s -> others 5 s
    watch = CotenantWatch(busy=Counter(100.0, 116.0), own=Counter(3.0, 14.0), clock=Counter(0.0, 10.0),
                          cpus=2, loadavg=Counter((1.5, 0, 0), (2.5, 0, 0)))
    watch.begin()
    watch.end()
    report = watch.report()
    assert (report["other_cpu_s"], report["own_cpu_s"], report["other_cpu_share"]) == (5.0, 11.0, 0.25)
    assert report["load_average_1m"] == [1.5, 2.5] and report["gpu_processes"] is None
    assert report["gpu_reason"] == "no GPU used"
    assert flag(report) is None  # 25 % is the threshold, not above it
    report["other_cpu_share"] = 0.6
    assert flag(report) == "outside load: other processes used 60% of 2 CPUs"


class Process:
    def __init__(self, pid, memory):
        self.pid, self.usedGpuMemory = pid, memory


class FakeNvml:
    NVMLError = pynvml.NVMLError

    def __init__(self, processes):
        self.processes = processes

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.processes


class Gpu:
    def __init__(self, nvml):
        self.nvml, self.handle, self.index = nvml, object(), 3


def test_other_processes_on_the_cells_gpus_are_listed_and_flagged():
    import os

    nvml = FakeNvml([Process(os.getpid(), 2**30), Process(999999, 512 * 2**20)])
    watch = CotenantWatch(gpus=[Gpu(nvml)], busy=Counter(0.0, 1.0), own=Counter(0.0, 1.0), clock=Counter(0.0, 1.0), cpus=4)
    watch.begin()
    watch.end()
    report = watch.report()
    assert report["gpu_processes"] == [{"gpu": 3, "pid": 999999, "used_memory_mb": 512.0}]  # ours left out
    assert flag(report) == "1 other process(es) on its GPUs (512 MB)"


def test_no_report_before_the_window_ended():
    assert CotenantWatch().report() == {"available": False, "reason": "the cell did not reach the end of its measured window"}
    assert flag(None) is None


def test_real_counters_on_this_machine():
    watch = CotenantWatch()
    watch.begin()
    sum(i * i for i in range(200000))  # some CPU time of our own
    watch.end()
    report = watch.report()
    assert report["own_cpu_s"] > 0 and report["other_cpu_s"] >= 0 and report["cpus"] >= 1
    assert 0 <= report["other_cpu_share"] == pytest.approx(report["other_cpu_s"] / (report["window_s"] * report["cpus"]))
