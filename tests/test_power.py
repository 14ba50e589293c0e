"""Power monitor against an injected fake NVML and a fake clock: expected joules by hand."""

import csv
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from specdec.job.power import (
    GpuResolutionError,
    PowerMonitor,
    PowerStateError,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402

from specdec.gate.cells import Power  # noqa: E402

CONFIG = Power(enabled=True, interval_ms=100, idle_s=2)


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


class FakeGpu:
    """Piecewise-constant power `steps` [(from_s, watts), ...]; counter = exact integral in mJ."""

    def __init__(self, uuid, steps, *, counter=True, counter_offset_mj=0, reset_at=None,
                 unsupported=(), name="Fake H100"):
        self.uuid, self.steps, self.counter, self.name = uuid, steps, counter, name
        self.offset, self.reset_at, self.unsupported = counter_offset_mj, reset_at, set(unsupported)

    def watts(self, t):
        return max(((s, w) for s, w in self.steps if s <= t), default=self.steps[0])[1]

    def energy_mj(self, t):
        edges = [start for start, _ in self.steps[1:]] + [float("inf")]
        return sum(w * max(0.0, min(t, end) - start) for (start, w), end in zip(self.steps, edges)) * 1000


def not_supported():
    return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


class FakeNVML:
    """The pynvml functions specdec.job.power calls; handles are FakeGpu objects."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    def __init__(self, clock, gpus, migs=None, event_reasons=True):
        self.clock, self.gpus, self.migs = clock, gpus, migs or {}
        self.calls = []
        if not event_reasons:  # an older nvidia-ml-py
            self.nvmlDeviceGetCurrentClocksEventReasons = None

    def _call(self, name, gpu=None):
        self.calls.append(name)
        if gpu is not None and name in gpu.unsupported:
            raise not_supported()

    def nvmlInit(self):
        self._call("init")

    def nvmlShutdown(self):
        self._call("shutdown")

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        found = [g for g in self.gpus if g.uuid == uuid] or [m for u, m in self.migs.items() if u == uuid]
        if not found:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return found[0]

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, mig):
        return mig.parent

    def nvmlDeviceGetUUID(self, gpu):
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu):
        return gpu.name.encode()  # older bindings return bytes

    def nvmlDeviceGetIndex(self, gpu):
        return self.gpus.index(gpu)

    def nvmlDeviceGetTotalEnergyConsumption(self, gpu):
        self._call("energy", gpu)
        if not gpu.counter:
            raise not_supported()
        t = self.clock()
        mj = gpu.energy_mj(t) - (gpu.energy_mj(gpu.reset_at) if gpu.reset_at and t >= gpu.reset_at else 0)
        return (gpu.offset + round(mj)) % 2**64

    def nvmlDeviceGetPowerUsage(self, gpu):
        self._call("power", gpu)
        return round(gpu.watts(self.clock()) * 1000)

    def nvmlDeviceGetUtilizationRates(self, gpu):
        self._call("util", gpu)
        return SimpleNamespace(gpu=97, memory=41)

    def nvmlDeviceGetMemoryInfo(self, gpu):
        self._call("memory", gpu)
        return SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        self._call("temp", gpu)
        return 61

    def nvmlDeviceGetClockInfo(self, gpu, clock):
        self._call("clock", gpu)
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu):
        self._call("events", gpu)
        return 4

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, gpu):
        self._call("throttle", gpu)
        return 8


def make_monitor(gpus, clock, config=CONFIG, visible=None, devices=None, **fake):
    nvml = FakeNVML(clock, gpus, **fake)
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    monitor = PowerMonitor.for_job(config, "cuda", devices=devices, nvml=nvml, clock=clock,
                                   sleep=getattr(clock, "sleep", None), environ=env)
    return monitor, nvml


def run_job(monitor, clock, begin=5.0, end=15.0, step=1.0):
    """Idle from t=0 for idle_s; window begin..end with a sample every `step` seconds."""
    monitor.measure_idle()
    clock.t = begin
    monitor.begin_window()
    while clock.t + step < end - 1e-9:
        clock.sleep(step)
        monitor.sample()
    clock.t = end
    monitor.end_window()


# 50 W idle until t=3, 100 W until t=10, then 200 W.
STEPS = [(0.0, 50.0), (3.0, 100.0), (10.0, 200.0)]


def test_energy_counter_window_with_idle_subtraction():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS)], clock)
    run_job(monitor, clock)
    e = monitor.energy(output_tokens=100, num_requests=4)
    assert e["available"] and e["method"] == "nvml_energy_counter" and e["scope"] == "gpu"
    assert e["window_s"] == pytest.approx(10.0)
    assert e["gross_j"] == pytest.approx(5 * 100 + 5 * 200)
    # samples at 5, 6, ..., 15: the 9->10 step averages 100 W and 200 W
    assert e["integral_gross_j"] == pytest.approx(4 * 100 + 150 + 5 * 200)
    assert e["idle_power_w"] == pytest.approx(50.0)
    assert e["idle_j"] == pytest.approx(500.0)
    assert e["net_j"] == pytest.approx(1000.0)
    assert e["per_request_j"] == pytest.approx({"gross": 375.0, "net": 250.0})
    assert e["per_output_token_j"] == pytest.approx({"gross": 15.0, "net": 10.0})
    assert e["tokens_per_j"] == pytest.approx({"gross": 100 / 1500, "net": 0.1})
    assert e["avg_power_w"] == pytest.approx(150.0)
    assert e["peak_power_w"] == pytest.approx(200.0)
    assert e["samples"] == 11 and not e["short_window"] and e["warnings"] == []
    assert e["gpus"] == [{"device": "cuda:0", "index": 0, "uuid": "GPU-aaa", "name": "Fake H100",
                          "method": "energy_counter", "gross_j": pytest.approx(1500.0),
                          "idle_power_w": pytest.approx(50.0)}]


def test_power_integral_when_counter_not_supported():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS, counter=False)], clock)
    run_job(monitor, clock)
    e = monitor.energy(output_tokens=100, num_requests=4)
    assert e["method"] == "nvml_power_integral"
    assert e["gross_j"] == pytest.approx(1550.0)
    assert e["idle_power_w"] == pytest.approx(50.0)
    assert e["net_j"] == pytest.approx(1050.0)


def test_counter_wrap_mid_window_is_seamless():
    # counter at t=8 (3*50 + 5*100 = 650 J) sits exactly at 2**64 mJ: it wraps to 0 there
    clock = FakeClock()
    gpu = FakeGpu("GPU-aaa", STEPS, counter_offset_mj=2**64 - 650_000)
    monitor, _ = make_monitor([gpu], clock)
    run_job(monitor, clock)
    begin, end = monitor._window
    assert monitor._ticks[begin].counters[0] > 2**63 > monitor._ticks[end].counters[0]  # it wrapped
    e = monitor.energy(output_tokens=100, num_requests=4)
    assert e["method"] == "nvml_energy_counter"
    assert e["gross_j"] == pytest.approx(1500.0)
    assert e["warnings"] == []


def test_counter_reset_falls_back_to_power_integral_with_warning():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS, reset_at=12.5)], clock)
    run_job(monitor, clock)
    e = monitor.energy(output_tokens=100, num_requests=4)
    assert e["method"] == "nvml_power_integral"
    assert e["gross_j"] == pytest.approx(1550.0)
    assert any("reset" in w and "cuda:0" in w for w in e["warnings"])


def test_two_gpus_are_summed_and_peak_is_of_the_total():
    clock = FakeClock()
    gpus = [FakeGpu("GPU-aaa", [(0.0, 100.0)]), FakeGpu("GPU-bbb", [(0.0, 50.0), (4.0, 300.0)])]
    monitor, _ = make_monitor(gpus, clock, visible="1,0")
    run_job(monitor, clock, begin=5.0, end=9.0)
    e = monitor.energy(output_tokens=10, num_requests=1)
    assert e["gross_j"] == pytest.approx(4 * 100 + 4 * 300)
    assert e["idle_power_w"] == pytest.approx(100 + 50)
    assert e["peak_power_w"] == pytest.approx(400.0)
    assert [(g["device"], g["uuid"], g["index"]) for g in e["gpus"]] == [
        ("cuda:0", "GPU-bbb", 1), ("cuda:1", "GPU-aaa", 0)]


def test_short_window_and_non_positive_net_are_flagged():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", [(0.0, 100.0)])], clock)
    run_job(monitor, clock, begin=3.0, end=3.5)
    e = monitor.energy(output_tokens=5, num_requests=1)
    assert e["short_window"] is True
    assert e["gross_j"] == pytest.approx(50.0) and e["net_j"] == pytest.approx(0.0)
    assert e["tokens_per_j"]["net"] is None and e["per_output_token_j"]["net"] is None
    assert any("short" in w for w in e["warnings"]) and any("net energy" in w for w in e["warnings"])


def test_idle_disabled_reports_unknown_net():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS)], clock, config=Power(idle_s=0))
    run_job(monitor, clock)
    e = monitor.energy(output_tokens=100, num_requests=4)
    assert e["gross_j"] == pytest.approx(1500.0)
    assert e["idle_power_w"] is None and e["idle_j"] is None and e["net_j"] is None
    assert e["per_output_token_j"]["net"] is None
    assert any("idle baseline not measured" in w for w in e["warnings"])


def test_window_order_is_enforced():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS)], clock)
    with pytest.raises(PowerStateError, match="begin_window"):
        monitor.energy(output_tokens=1, num_requests=1)
    with pytest.raises(PowerStateError):
        monitor.end_window()
    monitor.begin_window()
    with pytest.raises(PowerStateError, match="twice"):
        monitor.begin_window()


def test_sync_runs_at_every_edge():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS)], clock)
    synced = []
    monitor.measure_idle(sync=lambda: synced.append("idle"))
    monitor.begin_window(sync=lambda: synced.append("begin"))
    monitor.end_window(sync=lambda: synced.append("end"))
    assert synced == ["idle", "idle", "begin", "end"]


def test_timeline_fields_null_when_not_supported_and_phase_column(tmp_path):
    clock = FakeClock()
    gpu = FakeGpu("GPU-aaa", STEPS, unsupported={"temp", "util", "events"})
    monitor, _ = make_monitor([gpu], clock)
    clock.t = -1.0
    monitor.sample()  # before the idle baseline
    clock.t = 0.0
    run_job(monitor, clock, begin=5.0, end=7.0)
    clock.t = 8.0
    monitor.sample()  # after the window
    path = tmp_path / "power.csv"
    monitor.write_timeline(path)
    rows = list(csv.DictReader(path.open()))
    assert [r["phase"] for r in rows] == ["", "idle", "idle", "window", "window", "window", ""]
    assert [float(r["t_s"]) for r in rows] == [-6.0, -5.0, -3.0, 0.0, 1.0, 2.0, 3.0]
    window = rows[3]
    assert window["device"] == "cuda:0" and float(window["power_w"]) == 100.0
    assert window["temp_c"] == "" and window["gpu_util_pct"] == "" and window["throttle_reasons"] == ""
    assert float(window["mem_used_mib"]) == 3072.0 and window["sm_clock_mhz"] == "1980"
    assert not list(tmp_path.glob(".*.tmp"))


def test_older_bindings_use_the_throttle_reasons_call():
    clock = FakeClock()
    monitor, nvml = make_monitor([FakeGpu("GPU-aaa", STEPS)], clock, event_reasons=False)
    monitor.sample()
    assert monitor._ticks[-1].readings[0]["throttle_reasons"] == 8
    assert "throttle" in nvml.calls and "events" not in nvml.calls


def test_background_thread_samples_until_stopped():
    gpu = FakeGpu("GPU-aaa", [(0.0, 100.0)])
    monitor, nvml = make_monitor([gpu], time.perf_counter, config=Power(interval_ms=5, idle_s=0))
    with monitor:
        deadline = time.monotonic() + 10
        while len(monitor._ticks) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert monitor._thread.is_alive()
    assert len(monitor._ticks) >= 4
    assert monitor._thread is None and nvml.calls[-1] == "shutdown"
    count = len(monitor._ticks)
    time.sleep(0.05)
    assert len(monitor._ticks) == count


# ---- CUDA_VISIBLE_DEVICES -> NVML by UUID

THREE = ["GPU-1111-aaaa", "GPU-2222-bbbb", "GPU-2223-cccc"]


def resolved(visible, devices=None, migs=None):
    clock = FakeClock()
    gpus = [FakeGpu(u, [(0.0, 1.0)]) for u in THREE]
    for mig in (migs or {}).values():
        mig.parent = gpus[mig.parent]
    monitor, _ = make_monitor(gpus, clock, visible=visible, devices=devices, migs=migs)
    return [(g.label, g.uuid) for g in monitor.meters]


def test_visible_indices_uuids_and_prefixes_map_by_uuid():
    assert resolved(None) == [("cuda:0", THREE[0]), ("cuda:1", THREE[1]), ("cuda:2", THREE[2])]
    assert resolved("2,0") == [("cuda:0", THREE[2]), ("cuda:1", THREE[0])]
    assert resolved("GPU-2222-bbbb, GPU-1111") == [("cuda:0", THREE[1]), ("cuda:1", THREE[0])]
    assert resolved("2,0,1", devices=[1]) == [("cuda:1", THREE[0])]


def test_mig_entries_measure_their_parent_gpu_once():
    migs = {"MIG-aaaa": SimpleNamespace(parent=1), "MIG-bbbb": SimpleNamespace(parent=1)}
    assert resolved("MIG-aaaa,MIG-bbbb", migs=migs) == [("cuda:0", THREE[1])]
    assert resolved("MIG-GPU-2223-cccc/1/0") == [("cuda:0", THREE[2])]


@pytest.mark.parametrize("visible, devices, message", [
    ("0,7", None, r"entry 1 \('7'\): NVML sees 3 GPU"),
    ("GPU-9999", None, r"'GPU-9999'\) matches no GPU"),
    ("GPU-222", None, "ambiguous"),
    ("MIG-nope", None, "no MIG instance"),
    ("0", [1], "cuda:1 is not visible"),
    ("", None, "hides every GPU"),
])
def test_bad_visible_devices_raise_clear_errors(visible, devices, message):
    with pytest.raises(GpuResolutionError, match=message):
        resolved(visible, devices)


# ---- configuration and unavailable paths


def test_unknown_device_kind_is_refused():
    assert CONFIG.interval_s == pytest.approx(0.1)
    with pytest.raises(ValueError, match="device_kind"):
        PowerMonitor.for_job(CONFIG, "tpu")


def test_disabled_monitor_reports_unavailable_and_writes_an_empty_timeline(tmp_path):
    nvml = FakeNVML(FakeClock(), [FakeGpu("GPU-aaa", STEPS)])
    monitor = PowerMonitor.for_job(Power(enabled=False), "cuda", nvml=nvml)
    with monitor:
        monitor.measure_idle()
        monitor.begin_window()
        monitor.end_window()
    assert monitor.energy(10, 1) == {"available": False,
                                     "reason": "power monitoring disabled (power.enabled: false)"}
    assert nvml.calls == []
    monitor.write_timeline(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().startswith("t_s,phase,device,power_w")


def test_this_machine_without_nvml_reports_why(tmp_path):
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    monitor = PowerMonitor.for_job(CONFIG, "cuda", rapl_root=tmp_path / "absent")
    e = monitor.energy(10, 1)
    assert e["available"] is False
    assert e["reason"].startswith("NVML: ") and f"RAPL: {tmp_path / 'absent'} absent" in e["reason"]


def test_cpu_job_never_asks_nvml(tmp_path):
    nvml = FakeNVML(FakeClock(), [FakeGpu("GPU-aaa", STEPS)])
    monitor = PowerMonitor.for_job(CONFIG, "cpu", nvml=nvml, rapl_root=tmp_path)
    assert nvml.calls == []
    assert monitor.energy(1, 1) == {
        "available": False, "reason": f"cpu placement: no GPU used; RAPL: no intel-rapl package zones under {tmp_path}"}


# ---- RAPL through a fake sysfs


def rapl_zone(root, name, label, energy_uj, max_uj):
    zone = root / name
    zone.mkdir()
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_packages_with_wrap_idle_and_timeline(tmp_path):
    max_uj = 999_999_999  # the counter wraps to 0 after 1000 J
    pkg = rapl_zone(tmp_path, "intel-rapl:0", "package-0", 950_000_000, max_uj)
    rapl_zone(tmp_path, "intel-rapl:0:0", "core", 5, max_uj)  # a subzone: inside package-0
    clock = FakeClock()
    monitor = PowerMonitor.for_job(CONFIG, "cpu", clock=clock, sleep=clock.sleep, rapl_root=tmp_path)
    assert [m.label for m in monitor.meters] == ["package-0"]

    def advance(seconds, joules):
        clock.t += seconds
        value = int((pkg / "energy_uj").read_text())
        (pkg / "energy_uj").write_text(f"{(value + int(joules * 1_000_000)) % (max_uj + 1)}\n")

    # idle: 2 s at 10 W (written before measure_idle's sleep ends, as a real counter would)
    monitor.sample()
    start_idle = clock.t
    monitor._sleep = lambda s: advance(s, 10 * s)
    monitor.measure_idle()
    assert clock.t == start_idle + 2
    monitor.begin_window()
    for _ in range(3):  # 3 s at 40 W; wraps past 1000 J on the way
        advance(1, 40)
        monitor.sample()
    monitor.end_window()
    e = monitor.energy(output_tokens=12, num_requests=3)
    assert e["method"] == "rapl_energy_counter" and e["scope"] == "cpu"
    assert e["rapl_zones"][0]["zone"] == "intel-rapl:0"
    assert e["gross_j"] == pytest.approx(120.0)
    assert e["idle_power_w"] == pytest.approx(10.0)
    assert e["net_j"] == pytest.approx(120.0 - 30.0)
    assert e["per_output_token_j"]["gross"] == pytest.approx(10.0)
    assert e["peak_power_w"] == pytest.approx(40.0)
    monitor.write_timeline(tmp_path / "cpu.csv")
    rows = list(csv.DictReader((tmp_path / "cpu.csv").open()))
    # edges share a time with the step before them: no power derivable there
    assert [r["power_w"] for r in rows if r["phase"] == "window"] == ["", "40.0", "40.0", "40.0", ""]


def test_unreadable_rapl_counter_is_unavailable_with_reason(tmp_path):
    zone = rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1, 100)
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()  # reading fails like a root-only file would
    monitor = PowerMonitor.for_job(CONFIG, "cpu", rapl_root=tmp_path)
    assert not monitor.available
    assert monitor.reason.startswith("cpu placement: no GPU used; RAPL: ")
    assert "energy_uj not readable" in monitor.reason


def test_cuda_job_without_nvml_falls_back_to_rapl_and_says_so(tmp_path):
    rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1, 100)

    class NoLibrary(FakeNVML):
        def nvmlInit(self):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monitor = PowerMonitor.for_job(CONFIG, "cuda", nvml=NoLibrary(FakeClock(), []), rapl_root=tmp_path)
    assert monitor.source == "rapl" and monitor.scope == "cpu"
    assert "GPU energy not measured (NVML: " in monitor.warnings[0]


# ---- bench/gpu_check.py


def test_gpu_check_reports_counter_and_integral_side_by_side():
    clock = FakeClock()
    monitor, _ = make_monitor([FakeGpu("GPU-aaa", STEPS)], clock)
    clock.t = 0.0

    def load():  # 10 s of work, sampled each second, 40 iterations
        for _ in range(10):
            clock.sleep(1.0)
            monitor.sample()
        return 40

    clock_start = clock.t
    e = gpu_check.run_check(monitor, load, sync=None)
    assert clock.t == clock_start + 2 + 10
    assert e["gross_j"] == pytest.approx(1 * 50 + 7 * 100 + 2 * 200)  # window 2..12 s
    assert e["idle_power_w"] == pytest.approx(50.0)
    report = gpu_check.format_report(e)
    assert "energy counter" in report and "power integral" in report
    # integral over samples at 2, 3, ..., 12: (50+100)/2 + 6*100 + (100+200)/2 + 2*200
    assert "1150.0" in report and "1225.0" in report
    assert "650.0" in report and "725.0" in report  # net: minus 50 W x 10 s


def test_gpu_check_fails_clearly_without_nvml():
    class NoLibrary(FakeNVML):
        def nvmlInit(self):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    with pytest.raises(SystemExit, match="no NVML GPU found: NVML: "):
        gpu_check.main(["--seconds", "1"], nvml=NoLibrary(FakeClock(), []))
