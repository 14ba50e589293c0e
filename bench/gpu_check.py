"""Check the power monitor on a real GPU: energy from NVML's counter beside the power integral.

    python bench/gpu_check.py [--seconds 30] [--idle-s 3] [--device 0] [--timeline power.csv]

Runs fp16 matmuls on one GPU for `--seconds` (under five minutes in all) with an idle
baseline first, then prints gross, idle and net energy by both methods. The two should agree
within a few per cent; a larger gap means the sampling interval misses power swings.
Without an NVML GPU it exits with "no NVML GPU found: <why>".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from specdec.gate.cells import Power  # noqa: E402
from specdec.job.power import PowerMonitor, SourceUnavailable  # noqa: E402


def matmul_load(device: str, seconds: float, size: int = 8192):
    """A function that multiplies fp16 matrices on `device` for `seconds`; returns iterations."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.float16)
    b = torch.randn(size, size, device=device, dtype=torch.float16)

    def load() -> int:
        iterations, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(10):
                a @ b
            torch.cuda.synchronize(device)  # keeps the queue short so the loop's clock is honest
            iterations += 10
        return iterations

    return load


def run_check(monitor: PowerMonitor, load, sync) -> dict:
    """Idle baseline, then `load()` inside the window; its return value counts as tokens."""
    with monitor:
        monitor.measure_idle(sync)
        monitor.begin_window(sync)
        iterations = load()
        monitor.end_window(sync)
    return monitor.energy(output_tokens=iterations, num_requests=1)


def format_report(e: dict) -> str:
    gpus = ", ".join(f"{g['device']} = NVML {g['index']} {g['name']} {g['uuid']}" for g in e["gpus"])
    counter = e["gross_j"] if e["method"] == "nvml_energy_counter" else None
    integral = e["integral_gross_j"]

    def cell(value, unit="J"):
        return f"{value:12.1f} {unit}" if value is not None else f"{'n/a':>12}"

    idle_j = e["idle_j"]
    rows = [
        f"GPUs: {gpus}",
        f"window {e['window_s']:.2f} s, {e['samples']} samples every {e['interval_ms']:g} ms; "
        f"idle baseline {e['idle_s']:.2f} s at {cell(e['idle_power_w'], 'W').strip()}",
        f"{'':22}{'energy counter':>16}{'power integral':>16}",
        f"{'gross':22}{cell(counter):>16}{cell(integral):>16}",
        f"{'idle (power x window)':22}{cell(idle_j):>16}{cell(idle_j):>16}",
        f"{'net':22}{cell(None if None in (counter, idle_j) else counter - idle_j):>16}"
        f"{cell(None if None in (integral, idle_j) else integral - idle_j):>16}",
        f"avg {cell(e['avg_power_w'], 'W').strip()}, peak {cell(e['peak_power_w'], 'W').strip()}, "
        f"per iteration {e['per_output_token_j']['gross']:.4f} J",
    ]
    if counter and integral:
        rows.append(f"integral / counter = {integral / counter:.4f}")
    return "\n".join(rows + [f"warning: {w}" for w in e["warnings"]])


def main(argv=None, nvml=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--device", type=int, default=0, help="torch ordinal")
    parser.add_argument("--timeline", type=Path)
    args = parser.parse_args(argv)
    if args.seconds + args.idle_s > 270:
        parser.error("--seconds plus --idle-s must stay under 270 (the check runs under 5 minutes)")
    config = Power(interval_ms=args.interval_ms, idle_s=args.idle_s)
    try:
        monitor = PowerMonitor.for_gpus(config, devices=[args.device], nvml=nvml)
    except SourceUnavailable as exc:
        raise SystemExit(f"no NVML GPU found: {exc}") from exc

    import torch

    device = f"cuda:{args.device}"
    energy = run_check(monitor, matmul_load(device, args.seconds), lambda: torch.cuda.synchronize(device))
    print(format_report(energy))
    if args.timeline:
        monitor.write_timeline(args.timeline)
        print(f"timeline: {args.timeline}")


if __name__ == "__main__":
    main()
