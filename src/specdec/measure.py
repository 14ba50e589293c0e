"""Measure a loaded cell: the engine callable the load generator drives, and the measured
window (warm-up, then every request under the cell's load beside the power monitor and the
time attribution). An interleaved cell (`Cell.interleaved`) also decodes every request with
AR on the same loaded target, batch by batch (`load.BatchServer`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, TextIO

import torch

from specdec import attribution
from specdec.cotenants import CotenantWatch
from specdec.session import Session, chat_messages

log = logging.getLogger("specdec.run")


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(session: Session, generator: torch.Generator, recorder=None):
    """engine(batch of load.Request) -> row dicts: template and tokenise (outside the timed
    region, reported as `decode_start_ns`), decode with the cell's method, detokenise.
    `recorder` (an `attribution` recorder) times the decode calls and our accept steps."""
    from specdec.decoding import generate
    from specdec.engines import transformers_settings
    from specdec.peers import hf_generate

    tokenizer, target, cell, settings = session.tokenizer, session.target, session.cell, session.settings
    recorder = recorder or attribution.Off()
    accept_timer = recorder.accept if recorder.enabled else None

    def decode(input_ids, attention_mask):
        if cell.engine == "transformers":
            lookup = transformers_settings(cell)
            return hf_generate(target, input_ids, attention_mask, settings, assistant_model=session.drafter,
                               prompt_lookup_num_tokens=lookup.get("prompt_lookup_num_tokens"),
                               max_matching_ngram_size=lookup.get("max_matching_ngram_size"))
        return generate(target, input_ids, attention_mask, settings, drafter=session.drafter, generator=generator,
                        accept_timer=accept_timer)

    def engine(batch) -> list[dict]:
        began = time.perf_counter()
        encoded = tokenizer.apply_chat_template(
            [chat_messages(request) for request in batch],
            add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True,
        )
        input_ids, attention_mask = encoded["input_ids"].to(session.device), encoded["attention_mask"].to(session.device)
        for request, ids, mask in zip(batch, encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
            session.register_prompt(request.request_id, [t for t, m in zip(ids, mask) if m])
        tokenize_s = (time.perf_counter() - began) / len(batch)
        decode_start_ns = time.perf_counter_ns()
        with recorder.decode():
            results = decode(input_ids, attention_mask)
        rows = []
        for request, row in zip(batch, results):
            record = asdict(row)
            record.update(
                prompt_tokens=len(session.prompt_ids[request.request_id]),
                tokenize_s=tokenize_s,
                decode_start_ns=decode_start_ns,
                output_text=tokenizer.decode(row.output_ids, skip_special_tokens=True),
            )
            if not cell.greedy:
                del record["output_ids"]  # only greedy outputs are compared token for token
            rows.append(record)
        return rows

    return engine


# What the window's blocks of an interleaved cell hold (result.json `reference.window`).
INTERLEAVED_WINDOW = ("the power, energy and co-tenant windows hold the method's and its AR reference's requests "
                      "(energy per token over both sides' tokens); attribution times the method's decode calls only")


def reference_engine(session: Session, recorder) -> Callable[[list], list[dict]]:
    """The AR engine an interleaved cell decodes each request with too: the same loaded
    target, kernels and prompts, no drafter, a generator of its own seeded like the cell's,
    and nothing of it timed by the cell's attribution (`recorder.paused`)."""
    ar = session.cell.ar_counterpart()
    ar_session = dataclasses.replace(session, cell=ar, drafter=None, drafter_model=None, replayed=None,
                                     settings=dataclasses.replace(session.settings, gamma=0))
    engine = make_engine(ar_session, torch.Generator(device=session.device).manual_seed(ar.seed))

    def decode(batch) -> list[dict]:
        with recorder.paused():
            return engine(batch)

    return decode


def measure(session: Session, prompts: list[dict], out_dir: Path,
            console: TextIO | None = None) -> tuple[list[dict], list[dict] | None, dict]:
    """Warm up, then decode every prompt under the cell's load inside one window of power,
    time attribution and co-tenant watch. Returns the records, those of the interleaved AR
    reference (None unless `cell.interleaved`) and the window's result blocks (`energy`,
    `attribution`, `cotenants`). Progress goes to the log; with `console`, also there at
    most once a minute."""
    from specdec.load import progress, run_load, schedule, total_requests
    from specdec.power import PowerMonitor

    cell = session.cell
    torch.manual_seed(cell.seed)
    recorder = attribution.for_session(session)
    if cell.engine == "vllm":  # its engine process samples; `step()` returns finished GPU work
        from specdec.vllm_engine import VllmServer

        engine, device = VllmServer(session, steps=recorder if recorder.enabled else None), "cpu"
    else:
        generator = torch.Generator(device=session.device).manual_seed(cell.seed)
        engine, device = make_engine(session, generator, recorder), session.device

    def sync() -> None:
        synchronize(device)

    kind = torch.device(session.device).type
    monitor = PowerMonitor.for_job(cell.power, kind, devices=list(session.plan.gpus) or None)
    # The cell's GPUs are asked for their other processes through the power monitor's NVML.
    on_nvml = monitor.source == "nvml"
    neighbours = CotenantWatch(gpus=monitor.meters if on_nvml else None,
                               gpu_reason=None if on_nvml or kind == "cpu" else f"NVML not open: {monitor.reason}")
    total = total_requests(schedule(prompts, cell.load, cell.seed))

    def begin_window() -> None:
        log.info("warm-up done; measuring %d requests", total)
        monitor.begin_window(sync=sync)
        session.begin_window()
        recorder.begin()
        neighbours.begin()

    def end_window() -> None:
        monitor.end_window(sync=sync)  # the device is idle: the recorder's CUDA events are complete
        session.end_window()
        recorder.end()
        neighbours.end()

    # Snakemake shows every job's console at once: plain lines, not a bar.
    shown = progress(total, cell.id, stream=console, log_every_s=60, bar=False) if console is not None else nullcontext()
    with monitor, progress(total, cell.name) as bar, shown as line:

        def on_record(record: dict) -> None:
            bar.update(record)
            if line is not None:
                line.update(record)

        monitor.measure_idle(sync=sync)
        reference = reference_records = None
        if cell.interleaved:
            reference, reference_records = reference_engine(session, recorder), []
        records = run_load(
            prompts, engine, cell.load, cell.batch_size, seed=cell.seed, warmup=cell.warmup,
            on_record=on_record,
            on_window_start=begin_window,
            on_window_end=end_window,
            reference=reference,
            on_reference_record=None if reference_records is None else reference_records.append,
        )
    # The window's energy is both sides' when interleaved, and said to be (INTERLEAVED_WINDOW).
    measured = [r for r in records + (reference_records or []) if not r["warmup"]]
    energy = monitor.energy(output_tokens=sum(r["output_tokens"] for r in measured), num_requests=len(measured))
    if energy["available"]:
        monitor.write_timeline(out_dir / "power.csv")
        if cell.interleaved:
            energy["covers"] = INTERLEAVED_WINDOW
    return records, reference_records, {"energy": energy, "attribution": recorder.block(), "cotenants": neighbours.report()}
