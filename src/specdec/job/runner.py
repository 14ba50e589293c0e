"""Run one benchmark cell through its phases: lease GPUs, open its engine (`engines`), measure
(`measure`), analyse (`analysis`), and write `result.json` and `requests.jsonl` atomically.

Bad input (prompts, models, placement, an output folder that cannot be written) raises before
anything is written, so the job exits non-zero with a message naming the problem; so does a
cell that another process is running into the same folder (its lock, `CELL_LOCK`). A cell that
fails later (an exception, out of memory, its `timeout_s`) writes a result with status
`failed` (or `not_supported`) and the phase it was in, so the rest of the matrix goes on.
SIGTERM/SIGINT (a SLURM time limit) ends the cell without its outputs, so that Snakemake
reruns it, and leaves `interrupted.json` saying where it stopped.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, TextIO

import torch

from specdec.engines import Engine, NotSupported, engine_class, open_engine
from specdec.engines.session import check_context
from specdec.gate.cells import Cell
from specdec.job.analysis import analyse
from specdec.job.console import summary_table
from specdec.job.fingerprints import cell_inputs
from specdec.job.gpus import lease_gpus
from specdec.job.locks import holder, open_lock, sign, try_lock
from specdec.job.measure import measure
from specdec.metadata import collect_metadata
from specdec.records import (
    INTERLEAVED_REQUESTS,
    INTERRUPTED,
    RESULT_SCHEMA_VERSION,
    read_prompts,
    result_from_dict,
    write_interrupted,
    write_requests,
    write_result,
)
from specdec.result import Status

log = logging.getLogger("specdec.run")

OUTPUTS = ("result.json", "requests.jsonl", INTERLEAVED_REQUESTS)
CELL_LOCK = ".cell.lock"  # held by the process running the cell, which wrote its pid into it


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` (ours or a library's) records it as a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CellTimeout(Exception):
    """The cell ran past its configured `timeout_s`."""


class OutputNotWritable(ValueError):
    """The cell's output folder cannot be written: found before any model loads, or (a disk
    that filled up) when the outputs are written."""

    def __init__(self, out_dir: Path, error: OSError):
        super().__init__(f"output folder {out_dir} cannot be written: {error.strerror or error}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CellRunning(ValueError):
    """Another process is running the same cell into the same folder."""


@contextmanager
def claimed(out_dir: Path, cell_id: str) -> Iterator[None]:
    """Hold the cell's output folder while the block runs: a probe file written first, so
    that a read-only or full disk shows before the decode, not after it; then the cell's lock,
    so that a second run of the same cell (a hand-started one, or after Snakemake's
    --unlock) refuses to start and names the process that holds it. Folders made here go
    again when bad input stops the cell: bad input must leave nothing behind."""
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe.") as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
        lock = _lock_cell(out_dir, cell_id)
    except BaseException as exc:
        _remove(made)
        if isinstance(exc, OSError):
            raise OutputNotWritable(out_dir, exc) from None
        raise
    try:
        yield
    except ValueError:
        if made:
            (out_dir / CELL_LOCK).unlink(missing_ok=True)
            _remove(made)
        raise
    finally:
        lock.close()


def _lock_cell(out_dir: Path, cell_id: str):
    folder = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lock = open_lock(folder, out_dir, CELL_LOCK)
    finally:
        os.close(folder)
    if not try_lock(lock):
        running = holder(lock)
        lock.close()
        raise CellRunning(f"cell {cell_id} is running already: {running} holds {out_dir / CELL_LOCK}; "
                          "wait for it or end that process")
    sign(lock, cell_id)
    return lock


def _remove(made: list[Path]) -> None:
    """The folders made for the cell, deepest first, where nothing else was written into them."""
    for folder in made:
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


def failure_record(exc: BaseException, phase: str) -> dict:
    record = {"type": type(exc).__name__, "message": str(exc) or repr(exc), "phase": phase,
              "memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        record["cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _raise_timeout(signum, frame):
    raise CellTimeout("the cell ran past its timeout_s")


def run_cell(cell: Cell, prompts_path: Path, out_dir: Path, models_dir: Path = Path("resources/models"),
             reference: Path | None = None, threads: int | None = None, parity_reference: Path | None = None,
             kernels: dict[str, Path] | None = None, dataset_files: list[Path] = (),
             console: TextIO | None = None) -> dict:
    """Run one cell; returns the result written, or `{"status": "interrupted", "signal": N}`.

    `reference` is the requests.jsonl of the same engine's AR cell (greedy drafting is
    lossless), `parity_reference` that of our engine's AR cell (for a cell another engine
    runs). A cell its engine cannot run (`Engine.unsupported`) is written `not_supported`
    at once. `kernels`: the CPU kernel choice file of each role of `Engine.kernel_setups`;
    `dataset_files`: those the prompts were prepared from (their fingerprints, and the model
    folders' and the prompts', go into the result's `metadata.inputs`).
    Bad input raises (a ValueError) before anything is written. SIGTERM/SIGINT at
    any moment, the writing of the outputs included, leaves neither output file. `console`,
    if given, gets a line when the cell starts, its progress at most once a minute, and a
    line when it ends (the log gets everything)."""
    out_dir, started, began = Path(out_dir), now_iso(), time.monotonic()
    say = (lambda line: print(f"{cell.id}: {line}", file=console)) if console is not None else (lambda line: None)
    say("started")
    if threads:
        torch.set_num_threads(threads)
    phase = "setup"
    handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        prompts = read_prompts(prompts_path)
        with claimed(out_dir, cell.id):
            where = {"lease": None, "plan": None, "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
            reason = engine_class(cell.engine).unsupported(cell)
            if reason is not None:
                result, records, reference_records = _blank_result(), [], None
                result.update(status=Status.NOT_SUPPORTED.value, failure={"type": "NotSupported", "message": reason, "phase": phase})
                result["engine"] = engine_class(cell.engine).result_block({})
            else:
                lease = lease_gpus(engine_class(cell.engine).gpus_required(cell), label=cell.name)
                engine = open_engine(cell, Path(models_dir), kernels, reference)
                context = check_context(engine, prompts)
                engine.prepare(context, Path(models_dir).parent / "compile-cache")
                where |= {"lease": lease.describe(), "plan": engine.plan.describe()}
                phase = "measure"
                result, records, reference_records = _measure_and_analyse(engine, prompts, out_dir, reference, parity_reference, console)
            phase = "write"
            inputs = cell_inputs(cell, models_dir, prompts_path, dataset_files)  # after the load: a hub model is in its cache
            try:
                _write_outputs(cell, result, records, reference_records, where, inputs, started, out_dir)
            except OSError as exc:  # a disk that filled up during the decode
                raise OutputNotWritable(out_dir, exc) from None
    except Interrupted as exc:
        for name in OUTPUTS:  # one may be in place already if the signal came between the two renames
            (out_dir / name).unlink(missing_ok=True)
        write_interrupted(out_dir, cell.id, signal=str(exc), phase=phase, at=now_iso())
        log.error("interrupted by %s during %s; no result written, so the cell reruns", exc, phase)
        say(f"interrupted by {exc} during {phase}")
        return {"status": Status.INTERRUPTED.value, "signal": exc.signum}
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    log.info("\n%s", summary_table(result["metrics"], cell.name) if result["metrics"] else result["failure"])
    say(_ending(result, time.monotonic() - began))
    return result


def _ending(result: dict, elapsed_s: float) -> str:
    """The console's last line of a cell: its status, time, throughput and any failed check."""
    parts = [f"{result['status']} in {elapsed_s:.0f} s"]
    if result["metrics"]:
        parts.append(f"{result['metrics']['throughput_tok_s']:.1f} tok/s")
    failed = result.get("served", {}).get("failed_requests")
    if failed:
        parts.append(f"{failed} request{'s' * (failed != 1)} failed")
    if result["failure"]:
        parts.append(f"{result['failure']['type']}: {result['failure']['message']}"[:200])
    for check in ("correctness", "parity"):
        if result[check].get("status") == "failed":
            defects = result[check]["defects"]
            parts.append(f"{check} failed: {defects} defect{'s' * (defects != 1)}")
    return ", ".join(parts)


def _write_outputs(cell: Cell, result: dict, records: list[dict], reference_records: list[dict] | None, where: dict,
                   inputs: dict, started: str, out_dir: Path) -> None:
    """Complete and write the result; result.json goes last, as the mark of a finished cell."""
    result.update(schema_version=RESULT_SCHEMA_VERSION, cell_id=cell.id, group_id=cell.group_id, config=cell.to_dict())
    result["metadata"] = collect_metadata(seed=cell.seed, started_at=started, finished_at=now_iso()) | {"placement": where, "inputs": inputs}
    if reference_records is not None:
        write_requests(out_dir / INTERLEAVED_REQUESTS, reference_records)
    else:  # a rerun without interleaving leaves no stale reference beside the new result
        (out_dir / INTERLEAVED_REQUESTS).unlink(missing_ok=True)
    write_requests(out_dir / "requests.jsonl", records)
    write_result(out_dir / "result.json", result_from_dict(result, f"cell {cell.id}"))
    (out_dir / INTERRUPTED).unlink(missing_ok=True)


def _blank_result() -> dict:
    not_run = {"checked": False, "reason": "the cell did not finish"}
    return {"status": Status.OK.value, "failure": None, "metrics": None, "acceptance": None, "theory": None,
            "energy": {"available": False, "reason": "the cell did not reach its measured window"},
            "attribution": {"available": False, "reason": "the cell did not reach its measured window"},
            "correctness": not_run, "parity": not_run}


def _measure_and_analyse(engine: Engine, prompts: list[dict], out_dir: Path, reference: Path | None,
                         parity_reference: Path | None, console: TextIO | None = None) -> tuple[dict, list[dict], list[dict] | None]:
    """The result body, the request records and an interleaved AR reference's (or None); a failure here (an engine that does not
    start or dies, the cell's `timeout_s` included) is recorded, not raised, so that the
    rest of the matrix goes on."""
    result = _blank_result()
    phase = "start"
    if engine.cell.timeout_s:
        signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, engine.cell.timeout_s)
    try:
        engine.start(out_dir)
        result["engine"] = engine.result_block(engine.engine_settings)
        phase = "measure"
        records, reference_records, window = measure(engine, prompts, out_dir, console)
        result["engine"]["settings"] = engine.engine_settings  # again: what a drafter kept across the window
        result.update(window)
        phase = "analyse"
        result.update(analyse(engine, records, reference, parity_reference, reference_records))
        served = engine.served()
        if served is not None:
            result["served"] = served
        memory = engine.memory()  # None for vLLM: its memory is its engine process's, sized by its own settings
        if memory is not None:
            result["memory"] = memory
        return result, records, reference_records
    except Exception as exc:
        log.exception("cell failed during %s", phase)
        status = (Status.NOT_SUPPORTED if isinstance(exc, NotSupported) else Status.FAILED).value
        result.update(status=status, failure=failure_record(exc, phase))
        result.setdefault("engine", engine.result_block(engine.engine_settings))
        return result, [], None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        engine.close()  # free the models (stop vLLM's engine) before the outputs are written
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
