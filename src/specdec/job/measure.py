"""Measure an opened engine (`engines`): the measured window (warm-up, then every request
under the cell's load beside the power monitor, the time attribution and the co-tenant
watch). An interleaved cell's engine also decodes every request with AR (`load.BatchServer`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from specdec.job import attribution
from specdec.job.cotenants import CotenantWatch
from specdec.job.load import RequestProgress, RequestStream, progress, run_load
from specdec.job.power import PowerMonitor

log = logging.getLogger("specdec.run")


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# What the window's blocks of an interleaved cell hold (result.json `reference.window`).
INTERLEAVED_WINDOW = ("the power, energy and co-tenant windows hold the method's and its AR reference's requests "
                      "(energy per token over both sides' tokens); attribution times the method's decode calls only")


@dataclass
class _MeasuredWindow:
    """The window's edges for the power monitor, the engine's counters, the time attribution
    and the co-tenant watch (`load.Window`); each finished record goes to the progress lines."""

    engine: object  # an opened engines.Engine
    monitor: PowerMonitor
    recorder: object  # its attribution recorder
    neighbours: CotenantWatch
    total: int
    lines: list[RequestProgress]

    def sync(self) -> None:
        synchronize(self.engine.window_device)

    def begin(self) -> None:
        log.info("warm-up done; measuring %d requests", self.total)
        self.monitor.begin_window(sync=self.sync)
        self.engine.begin_window()
        self.recorder.begin()
        self.neighbours.begin()

    def end(self) -> None:
        self.monitor.end_window(sync=self.sync)  # the device is idle: the recorder's CUDA events are complete
        self.engine.end_window()
        self.recorder.end()
        self.neighbours.end()

    def finished(self, record: dict) -> None:
        for line in self.lines:
            line.update(record)


def measure(engine, prompts: list[dict], out_dir: Path,
            console: TextIO | None = None) -> tuple[list[dict], list[dict] | None, dict]:
    """Warm up, then decode every prompt under the cell's load inside one window of power,
    time attribution and co-tenant watch. Returns the records, those of the interleaved AR
    reference (None unless `cell.interleaved`) and the window's result blocks (`energy`,
    `attribution`, `cotenants`). Progress goes to the log; with `console`, also there at
    most once a minute."""
    cell = engine.cell
    torch.manual_seed(cell.seed)
    recorder = engine.recorder() if cell.attribution else attribution.Off()
    server = engine.server(recorder)
    kind = torch.device(engine.device).type
    monitor = PowerMonitor.for_job(cell.power, kind, devices=list(engine.plan.gpus) or None)
    # The cell's GPUs are asked for their other processes through the power monitor's NVML.
    on_nvml = monitor.source == "nvml"
    neighbours = CotenantWatch(gpus=monitor.meters if on_nvml else None,
                               gpu_reason=None if on_nvml or kind == "cpu" else f"NVML not open: {monitor.reason}")
    stream = RequestStream.of(cell, prompts)
    total = stream.total_requests()

    # Snakemake shows every job's console at once: plain lines, not a bar.
    shown = progress(total, cell.id, stream=console, log_every_s=60, bar=False) if console is not None else nullcontext()
    with monitor, progress(total, cell.name) as bar, shown as line:
        window = _MeasuredWindow(engine, monitor, recorder, neighbours, total, [bar] + ([line] if line is not None else []))
        monitor.measure_idle(sync=window.sync)
        served = run_load(stream, server, window)
    records, reference_records = served.records, served.reference
    # The window's energy is both sides' when interleaved, and said to be (INTERLEAVED_WINDOW).
    measured = [r for r in records + (reference_records or []) if not r["warmup"]]
    energy = monitor.energy(output_tokens=sum(r["output_tokens"] for r in measured), num_requests=len(measured))
    if energy["available"]:
        monitor.write_timeline(out_dir / "power.csv")
        if cell.interleaved:
            energy["covers"] = INTERLEAVED_WINDOW
    return records, reference_records, {"energy": energy, "attribution": recorder.block(), "cotenants": neighbours.report()}
