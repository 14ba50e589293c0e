"""Energy and power measured beside a benchmark job: NVML on GPUs, RAPL on CPUs.

Usage (the runner)::

    monitor = PowerMonitor.for_job(cell.power, "cuda", devices=[0])  # or "cpu"
    with monitor:                                    # background sampler thread
        monitor.measure_idle(sync=torch.cuda.synchronize)    # models loaded, nothing running
        monitor.begin_window(sync=torch.cuda.synchronize)
        ...                                          # the measured requests
        monitor.end_window(sync=torch.cuda.synchronize)
    result["energy"] = monitor.energy(output_tokens=512, num_requests=8)
    monitor.write_timeline(run_dir / "power.csv")

`power` settings: a `cells.Power` (config ``{"enabled": true, "interval_ms": 100, "idle_s": 2}``).

Sources, chosen once per job:

* ``cuda`` jobs: NVML (nvidia-ml-py) for exactly the GPUs the job uses. torch's device ``i``
  is the ``i``-th entry of ``CUDA_VISIBLE_DEVICES`` (indices, ``GPU-`` UUIDs or unique
  prefixes, ``MIG-`` ids); each entry is mapped to an NVML handle by UUID. An index entry is
  read as an NVML index, which is CUDA's numbering when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set
  it on machines with mixed GPU models). A MIG instance is measured through its parent GPU,
  whose energy covers the whole chip. Energy comes from the total-energy counter (mJ,
  Volta and newer) where supported, else from the trapezoid integral of sampled power.
  Without NVML the job falls back to RAPL and says so in ``warnings`` (``scope: "cpu"``).
* ``cpu`` jobs never ask NVML: RAPL package zones (``/sys/class/powercap/intel-rapl:N``)
  where readable, else ``{"available": false, "reason": "cpu placement: no GPU used; RAPL: ..."}``.

Counters are summed step by step between successive samples, modulo their range (2**64 mJ
for NVML, ``max_energy_range_uj`` for RAPL), so wraps cost nothing. A step whose implied power
exceeds ``MAX_PLAUSIBLE_W`` is a reset (driver reload), not a wrap: that device's energy then
comes from the power integral, with a warning. Idle power is measured over ``idle_s`` before
the window; ``net_j = gross_j - idle_power_w * window_s``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Callable, Sequence

import pynvml

from specdec.gate.cells import Power
from specdec.records import POWER_FIELDS, write_power_samples

RAPL_ROOT = Path("/sys/class/powercap")
NVML_COUNTER_MODULUS = 2**64
# No single device draws this much; a larger step between counter reads is a reset.
MAX_PLAUSIBLE_W = 5000.0
# The NVML energy counter updates every 20-100 ms: a step this long may hold one update.
COUNTER_UPDATE_S = 0.1
# Below this, one counter update is 10 % or more of the window.
SHORT_WINDOW_S = 1.0

Sync = Callable[[], Any] | None


class GpuResolutionError(ValueError):
    """CUDA_VISIBLE_DEVICES or the job's device list names a GPU NVML cannot find."""


class PowerStateError(RuntimeError):
    """Monitor methods were called out of order."""


class SourceUnavailable(Exception):
    """A power source cannot be used here; the message says why."""


# --------------------------------------------------------------------------- meters


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpu:
    """One physical GPU read through NVML; unsupported fields read as None."""

    unit_j = 1e-3
    modulus = NVML_COUNTER_MODULUS

    def __init__(self, nvml, handle, ordinal: int, mig: str | None = None):
        self.nvml, self.handle, self.ordinal, self.mig = nvml, handle, ordinal, mig
        self.uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        self.name = _text(nvml.nvmlDeviceGetName(handle))
        self.index = nvml.nvmlDeviceGetIndex(handle)
        self.label = f"cuda:{ordinal}"
        self._throttle = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                          or nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        self.has_counter = self._field(nvml.nvmlDeviceGetTotalEnergyConsumption) is not None
        if not self.has_counter and self._field(nvml.nvmlDeviceGetPowerUsage) is None:
            raise SourceUnavailable(f"NVML: GPU {self.index} ({self.name}) reports neither "
                                    "an energy counter nor power usage")

    def describe(self) -> dict:
        info = {"device": self.label, "index": self.index, "uuid": self.uuid, "name": self.name}
        return {**info, "mig": self.mig} if self.mig else info

    def _field(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:  # NotSupported and friends: this field is null
            return None

    def read_counter(self) -> int | None:
        return self._field(self.nvml.nvmlDeviceGetTotalEnergyConsumption) if self.has_counter else None

    def read(self, t: float, counter: int | None) -> dict:
        nvml = self.nvml
        power_mw = self._field(nvml.nvmlDeviceGetPowerUsage)
        util = self._field(nvml.nvmlDeviceGetUtilizationRates)
        memory = self._field(nvml.nvmlDeviceGetMemoryInfo)
        return {
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "gpu_util_pct": None if util is None else util.gpu,
            "mem_util_pct": None if util is None else util.memory,
            "mem_used_mib": None if memory is None else memory.used / 2**20,
            "temp_c": self._field(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": self._field(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
            "throttle_reasons": self._field(self._throttle),
        }


class RaplZone:
    """One RAPL package zone; power is derived from successive counter reads."""

    unit_j = 1e-6
    has_counter = True

    def __init__(self, zone_dir: Path):
        self.energy_file = zone_dir / "energy_uj"
        self.zone = zone_dir.name
        self.label = _read_sysfs(zone_dir / "name")
        # energy_uj runs 0..max_energy_range_uj, then wraps to 0.
        self.modulus = int(_read_sysfs(zone_dir / "max_energy_range_uj")) + 1
        int(_read_sysfs(self.energy_file))  # root-only on many kernels: SourceUnavailable
        self._last: tuple[float, int] | None = None

    def describe(self) -> dict:
        return {"zone": self.zone, "name": self.label}

    def read_counter(self) -> int | None:
        try:
            return int(self.energy_file.read_text())
        except (OSError, ValueError):  # a failed read in the sampler thread is a gap, not a crash
            return None

    def read(self, t: float, counter: int | None) -> dict:
        power = None
        if self._last is not None and counter is not None and t > self._last[0]:
            step_j = _counter_step_j(self._last[1], counter, self.modulus, self.unit_j, t - self._last[0])
            power = None if step_j is None else step_j / (t - self._last[0])
        if counter is not None:
            self._last = (t, counter)
        return {"power_w": power}


def _read_sysfs(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SourceUnavailable(f"{path} not readable: {exc.strerror or exc}") from exc


def find_rapl_zones(root: Path = RAPL_ROOT) -> list[RaplZone]:
    """The readable package zones (``intel-rapl:N``; subzones are inside them, not added)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceUnavailable(f"{root} absent")
    zones = sorted(p for p in root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
    if not zones:
        raise SourceUnavailable(f"no intel-rapl package zones under {root}")
    return [RaplZone(zone) for zone in zones]


# --------------------------------------------------------------------------- NVML devices


def _nvml_entry_handle(nvml, entry: str, position: int, uuids: list[str]):
    """NVML handle and MIG id (or None) for one CUDA_VISIBLE_DEVICES entry."""
    where = f"CUDA_VISIBLE_DEVICES entry {position} ({entry!r})"
    if entry.isdigit():
        index = int(entry)
        if index >= len(uuids):
            raise GpuResolutionError(f"{where}: NVML sees {len(uuids)} GPU(s), indices 0-{len(uuids) - 1}")
        return nvml.nvmlDeviceGetHandleByUUID(uuids[index]), None
    if entry.startswith("MIG-"):
        parent = re.fullmatch(r"MIG-(GPU-[^/]+)/\d+/\d+", entry)  # pre-R470 form
        if parent:
            return _nvml_entry_handle(nvml, parent.group(1), position, uuids)[0], entry
        try:
            mig = nvml.nvmlDeviceGetHandleByUUID(entry)
        except nvml.NVMLError as exc:
            raise GpuResolutionError(f"{where}: NVML knows no MIG instance by that id ({exc})") from exc
        return nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig), entry
    # CUDA accepts any unique prefix of a GPU UUID.
    matches = [u for u in uuids if u == entry] or [u for u in uuids if u.startswith(entry)]
    if len(matches) != 1:
        problem = "matches no GPU" if not matches else f"is ambiguous ({len(matches)} GPUs)"
        raise GpuResolutionError(f"{where} {problem}; NVML sees {uuids}")
    return nvml.nvmlDeviceGetHandleByUUID(matches[0]), None


def resolve_gpus(nvml, visible: str | None, devices: Sequence[int] | None = None) -> list[NvmlGpu]:
    """Map torch ordinals `devices` (default: all visible) to NVML GPUs by UUID."""
    count = nvml.nvmlDeviceGetCount()
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    entries = [str(i) for i in range(count)] if visible is None else [
        e.strip() for e in visible.split(",") if e.strip()]
    if not entries:
        raise GpuResolutionError(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from a cuda job")
    ordinals = list(range(len(entries))) if devices is None else list(devices)
    gpus: dict[str, NvmlGpu] = {}
    for ordinal in ordinals:
        if not 0 <= ordinal < len(entries):
            raise GpuResolutionError(f"job device cuda:{ordinal} is not visible: CUDA_VISIBLE_DEVICES "
                                     f"has {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
        handle, mig = _nvml_entry_handle(nvml, entries[ordinal], ordinal, uuids)
        gpu = NvmlGpu(nvml, handle, ordinal, mig)
        gpus.setdefault(gpu.uuid, gpu)  # two MIG instances of one GPU: measure the chip once
    return list(gpus.values())


def open_nvml(nvml, visible: str | None, devices: Sequence[int] | None):
    """(nvml module, GPUs), or SourceUnavailable naming why NVML cannot be used."""
    nvml = nvml or pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise SourceUnavailable(f"NVML: {exc}") from exc
    try:
        if nvml.nvmlDeviceGetCount() == 0:
            raise SourceUnavailable("NVML: no GPU found")
        return nvml, resolve_gpus(nvml, visible, devices)
    except BaseException:
        nvml.nvmlShutdown()
        raise


# --------------------------------------------------------------------------- energy arithmetic


def _counter_step_j(before: int, after: int, modulus: int, unit_j: float, dt: float) -> float | None:
    """Joules between two counter reads, across a wrap; None for a reset."""
    joules = ((after - before) % modulus) * unit_j
    return None if joules > MAX_PLAUSIBLE_W * max(dt, COUNTER_UPDATE_S) else joules


def counter_energy_j(reads: Sequence[tuple[float, int | None]], modulus: int, unit_j: float) -> float | None:
    """Energy from (time, raw counter) reads; None when a step shows a reset."""
    valid = [(t, c) for t, c in reads if c is not None]
    steps = [_counter_step_j(c0, c1, modulus, unit_j, t1 - t0) for (t0, c0), (t1, c1) in pairwise(valid)]
    return None if not valid or None in steps else sum(steps)


def trapezoid_j(points: Sequence[tuple[float, float | None]]) -> float | None:
    """Trapezoid integral of (time, watts); None with fewer than two power readings."""
    valid = [(t, w) for t, w in points if w is not None]
    if len(valid) < 2:
        return None
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in pairwise(valid))


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


@dataclass
class _Tick:
    t: float
    counters: list[int | None]
    readings: list[dict]


# --------------------------------------------------------------------------- the monitor


class PowerMonitor:
    """Samples power in a background thread; measures an idle baseline and one window."""

    def __init__(self, config: Power, meters: Sequence[NvmlGpu | RaplZone] = (), *,
                 source: str | None = None, reason: str | None = None, warnings: Sequence[str] = (),
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], Any] | None = None,
                 shutdown: Callable[[], Any] | None = None):
        self.config, self.meters, self.source, self.reason = config, list(meters), source, reason
        self.scope = "gpu" if source == "nvml" else "cpu"
        self.warnings = list(warnings)
        self._clock = clock or time.perf_counter
        self._sleep = sleep or time.sleep
        self._shutdown = shutdown
        self._ticks: list[_Tick] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle: tuple[int, int] | None = None
        self._window: list[int] = []

    @classmethod
    def for_job(cls, config: Power, device_kind: str, *, devices: Sequence[int] | None = None,
                nvml=None, clock=None, sleep=None, rapl_root: Path = RAPL_ROOT,
                environ: dict | None = None) -> "PowerMonitor":
        """The monitor for a job on `device_kind` ("cuda"|"cpu") using torch ordinals `devices`."""
        timing = {"clock": clock, "sleep": sleep}
        if not config.enabled:
            return cls(config, reason="power monitoring disabled (power.enabled: false)", **timing)
        if device_kind == "cuda":
            try:
                return cls.for_gpus(config, devices=devices, nvml=nvml, environ=environ, **timing)
            except SourceUnavailable as exc:
                why_not_gpu = str(exc)
        elif device_kind == "cpu":
            why_not_gpu = "cpu placement: no GPU used"
        else:
            raise ValueError(f"device_kind: expected 'cuda' or 'cpu', got {device_kind!r}")
        try:
            zones = find_rapl_zones(rapl_root)
        except SourceUnavailable as exc:
            return cls(config, reason=f"{why_not_gpu}; RAPL: {exc}", **timing)
        warnings = [] if device_kind == "cpu" else [
            f"GPU energy not measured ({why_not_gpu}); energy is the CPU packages' (RAPL)"]
        return cls(config, zones, source="rapl", warnings=warnings, **timing)

    @classmethod
    def for_gpus(cls, config: Power, *, devices: Sequence[int] | None = None, nvml=None,
                 environ: dict | None = None, clock=None, sleep=None) -> "PowerMonitor":
        """An NVML monitor of the job's GPUs; SourceUnavailable says why NVML cannot serve."""
        visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
        nvml, gpus = open_nvml(nvml, visible, devices)
        return cls(config, gpus, source="nvml", shutdown=nvml.nvmlShutdown, clock=clock, sleep=sleep)

    @property
    def available(self) -> bool:
        return bool(self.meters)

    # ---- sampling

    def sample(self) -> int:
        """Read every meter once (thread-safe); returns the tick's index."""
        with self._lock:
            t = self._clock()
            counters = [m.read_counter() for m in self.meters]
            readings = [m.read(t, c) for m, c in zip(self.meters, counters)]
            self._ticks.append(_Tick(t, counters, readings))
            return len(self._ticks) - 1

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            self.sample()

    def start(self) -> None:
        if self.available and self._thread is None:
            self.sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="specdec-power", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop sampling and release NVML; results stay readable."""
        self.stop()
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None

    def __enter__(self) -> "PowerMonitor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- idle and window edges

    def _edge(self, sync: Sync) -> int:
        if sync is not None:
            sync()  # queued device work belongs to the side of the edge it was issued on
        return self.sample()

    def measure_idle(self, sync: Sync = None) -> None:
        """Record `idle_s` seconds of idle power; call with models loaded and nothing running."""
        if self.available and self.config.idle_s > 0:
            start = self._edge(sync)
            self._sleep(self.config.idle_s)
            self._idle = (start, self._edge(sync))

    def begin_window(self, sync: Sync = None) -> None:
        if self._window:
            raise PowerStateError("begin_window() called twice")
        self._window = [self._edge(sync) if self.available else -1]

    def end_window(self, sync: Sync = None) -> None:
        if len(self._window) != 1:
            raise PowerStateError("end_window() needs exactly one begin_window() before it")
        self._window.append(self._edge(sync) if self.available else -1)

    # ---- results

    def _span(self, first: int, last: int) -> tuple[float, list[dict]]:
        """Duration and, per meter, energy over ticks first..last."""
        ticks = self._ticks[first:last + 1]
        per_meter = []
        for k, meter in enumerate(self.meters):
            integral = trapezoid_j([(tick.t, tick.readings[k]["power_w"]) for tick in ticks])
            counter = counter_energy_j([(tick.t, tick.counters[k]) for tick in ticks],
                                       meter.modulus, meter.unit_j) if meter.has_counter else None
            reset = meter.has_counter and counter is None
            per_meter.append({"joules": integral if counter is None else counter, "integral_j": integral,
                              "method": "power_integral" if counter is None else "energy_counter",
                              "reset": reset})
        return ticks[-1].t - ticks[0].t, per_meter

    def energy(self, output_tokens: int, num_requests: int) -> dict:
        """The result's `energy` block for the measured window."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        if len(self._window) != 2:
            raise PowerStateError("energy() needs begin_window() and end_window() first")
        window_s, window = self._span(*self._window)
        idle_s, idle = self._span(*self._idle) if self._idle else (0.0, None)
        warnings = list(self.warnings)
        devices = []
        for k, meter in enumerate(self.meters):
            idle_w = None if idle is None else _ratio(idle[k]["joules"], idle_s)
            if window[k]["reset"] or (idle is not None and idle[k]["reset"]):
                warnings.append(f"energy counter of {meter.label} reset during the run; "
                                "its energy is the power integral")
            if window[k]["joules"] is None:
                return {"available": False, "reason": f"{self.source}: no power readings from "
                                                      f"{meter.label} in the window"}
            devices.append({**meter.describe(), "method": window[k]["method"],
                            "gross_j": window[k]["joules"], "idle_power_w": idle_w})
        methods = {d["method"] for d in devices}
        gross = sum(d["gross_j"] for d in devices)
        idle_w = None if idle is None or None in [d["idle_power_w"] for d in devices] else sum(
            d["idle_power_w"] for d in devices)
        if idle is None:
            warnings.append("idle baseline not measured (power.idle_s: 0): net energy unknown")
        idle_j = None if idle_w is None else idle_w * window_s
        net = None if idle_j is None else gross - idle_j
        if net is not None and net <= 0:
            warnings.append(f"net energy {net:.3f} J is not positive: the load is within idle noise")
        short = window_s < SHORT_WINDOW_S
        if short:
            warnings.append(f"window {window_s:.3f} s is short against the energy counter's "
                            f"20-100 ms update period and the {self.config.interval_s * 1000:g} ms sampling")
        integrals = [w["integral_j"] for w in window]
        totals = [sum(r["power_w"] for r in tick.readings)
                  for tick in self._ticks[self._window[0]:self._window[1] + 1]
                  if all(r["power_w"] is not None for r in tick.readings)]

        def both(fn):
            return {"gross": fn(gross), "net": None if net is None or net <= 0 else fn(net)}

        return {
            "available": True, "source": self.source, "scope": self.scope,
            "method": f"{self.source}_{methods.pop()}" if len(methods) == 1 else "mixed",
            ("gpus" if self.source == "nvml" else "rapl_zones"): devices,
            "window_s": window_s, "samples": self._window[1] - self._window[0] + 1,
            "interval_ms": self.config.interval_s * 1000, "idle_s": idle_s,
            "gross_j": gross, "integral_gross_j": None if None in integrals else sum(integrals),
            "idle_power_w": idle_w, "idle_j": idle_j, "net_j": net,
            "per_request_j": both(lambda j: _ratio(j, num_requests)),
            "per_output_token_j": both(lambda j: _ratio(j, output_tokens)),
            "tokens_per_j": both(lambda j: _ratio(output_tokens, j)),
            "avg_power_w": _ratio(gross, window_s), "peak_power_w": max(totals, default=None),
            "short_window": short, "warnings": warnings,
        }

    def write_timeline(self, path: str | os.PathLike) -> None:
        """power.csv (`records.write_power_samples`), one row per sample and device; `t_s` is
        seconds from the window's start, `phase` marks idle and window rows, unsupported fields
        are empty."""
        with self._lock:
            ticks = list(self._ticks)
        t0 = ticks[self._window[0]].t if self._window and self.available else (ticks[0].t if ticks else 0.0)
        spans = [("window", self._window), ("idle", self._idle)]

        def phase(i: int) -> str:
            return next((name for name, span in spans if span and len(span) == 2 and span[0] <= i <= span[1]), "")

        write_power_samples(path, (
            (f"{tick.t - t0:.6f}", phase(i), meter.label, reading.get("power_w"), *(reading.get(f) for f in POWER_FIELDS))
            for i, tick in enumerate(ticks)
            for meter, reading in zip(self.meters, tick.readings)
        ))
