"""The file contract between jobs: prompt, cell, head-job, training, request, result,
interruption and power-sample records and their schemas. Writers validate before they write, readers after they read, against
the same schema (`schemas/*.schema.json`; power.csv's is its declared columns); every file is
written atomically (`specdec.io`). The result's typed body and status enum are `specdec.result`'s."""

from __future__ import annotations

import csv
import json
import math
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

from specdec.gate.cells import Cell, HeadJob
from specdec.io import atomic_open, write_json, write_jsonl
from specdec.result import Result, Status

RESULT_SCHEMA_VERSION = 4
# An interleaved cell's AR requests, beside its requests.jsonl (same schema, `request`).
INTERLEAVED_REQUESTS = "reference_requests.jsonl"
# What a cell stopped by a signal leaves in its folder instead of its outputs.
INTERRUPTED = "interrupted.json"
# power.csv, the power monitor's samples beside a result: one row per sample and device, these
# columns first (all required), then POWER_FIELDS (empty where the device does not report one).
POWER_SAMPLES = "power.csv"
POWER_KEYS = ("t_s", "phase", "device", "power_w")
POWER_FIELDS = ("gpu_util_pct", "mem_util_pct", "mem_used_mib", "temp_c", "sm_clock_mhz", "throttle_reasons")


class RecordError(ValueError):
    """A record that breaks its schema, or a file that cannot be read; names the file and path."""


def schema_path(name: str) -> Path:
    return Path(str(resources.files("specdec") / "schemas" / f"{name}.schema.json"))


@lru_cache(maxsize=None)
def _validator(name: str) -> Draft202012Validator:
    def retrieve(uri: str) -> Resource:
        return Resource.from_contents(json.loads(schema_path(uri.rsplit("/", 1)[-1].removesuffix(".schema.json")).read_text()))

    schema = json.loads(schema_path(name).read_text())
    return Draft202012Validator(schema, registry=Registry(retrieve=retrieve), format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate(kind: str, record: Any, source: str) -> None:
    """Raise RecordError naming `source` and the JSON path of the most relevant violation."""
    error = best_match(_validator(kind).iter_errors(record))
    if error is not None:
        raise RecordError(f"{source}: {error.json_path}: {error.message}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RecordError(f"{path}: cannot read JSON: {err}") from None


def _write_valid(kind: str, path: str | os.PathLike, record: Any) -> None:
    validate(kind, record, str(path))
    write_json(path, record)


def _read_valid(kind: str, path: str | os.PathLike) -> Any:
    record = _read_json(Path(path))
    validate(kind, record, str(path))
    return record


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: cannot read: {err}") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise RecordError(f"{path}:{number}: not valid JSON: {err}") from None


# ---------------------------------------------------------------------- prompts


def _unique_prompts(located: Iterable[tuple[str, Any]]) -> list[dict]:
    """Validate (location, record) pairs; ids must be unique within a file."""
    records, first_seen = [], {}
    for where, record in located:
        validate("prompt", record, where)
        if record["id"] in first_seen:
            raise RecordError(f"{where}: duplicate id {record['id']!r} (first at {first_seen[record['id']]})")
        first_seen[record["id"]] = where
        records.append(record)
    return records


def write_prompts(path: str | os.PathLike, records: list[dict]) -> None:
    """Prompt records as JSON lines; refuses an empty or invalid list."""
    if not records:
        raise RecordError(f"{path}: refusing to write an empty prompt file")
    write_jsonl(path, _unique_prompts((f"record {i}", r) for i, r in enumerate(records)))


def read_prompts(path: str | os.PathLike) -> list[dict]:
    records = _unique_prompts((f"{path}:{number}", record) for number, record in _read_jsonl(Path(path)))
    if not records:
        raise RecordError(f"{path}: no prompt records")
    return records


# ------------------------------------------------------------------------ cells


def write_cell(cell: Cell, path: str | os.PathLike) -> None:
    data = cell.to_dict()
    validate("cell", data, f"cell {cell.id}")
    write_json(path, data)


def cell_from_dict(data: Any, source: str) -> Cell:
    validate("cell", data, source)
    return Cell.from_dict(data)


def read_cell(path: str | os.PathLike) -> Cell:
    path = Path(path)
    return cell_from_dict(_read_json(path), str(path))


# ---------------------------------------------------------------- learned heads


def head_job_from_json(text: str, source: str) -> HeadJob:
    """A head training job as the workflow passes it (`HeadJob.to_dict` as JSON text)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"{source}: not JSON ({error.msg})") from None
    validate("head_job", data, source)
    return HeadJob.from_dict(data)


def write_training(path: str | os.PathLike, record: dict) -> None:
    _write_valid("training", path, record)


def read_training(path: str | os.PathLike) -> dict:
    return _read_valid("training", path)


# -------------------------------------------------------------- kernel choices


def write_kernel_choice(path: str | os.PathLike, choice: dict) -> None:
    _write_valid("kernels", path, choice)


def read_kernel_choice(path: str | os.PathLike) -> dict:
    return _read_valid("kernels", path)


# --------------------------------------------------------------------- requests


def write_requests(path: str | os.PathLike, records: list[dict]) -> None:
    for i, record in enumerate(records):
        validate("request", record, f"{path}: record {i + 1}")
    write_jsonl(path, records)


def read_requests(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    records = []
    for number, record in _read_jsonl(path):
        validate("request", record, f"{path}:{number}")
        records.append(record)
    return records


def read_reference_outputs(path: str | os.PathLike) -> dict[str, list[int]]:
    """Request id -> output token ids of a greedy cell's requests.jsonl (warm-up requests
    included), what a replay drafter replays; a file without output ids is refused."""
    outputs = {}
    for record in read_requests(path):
        if "output_ids" not in record:
            raise RecordError(f"{path}: request {record['request_id']!r} has no output_ids (only greedy cells record them)")
        outputs[record["request_id"]] = record["output_ids"]
    if not outputs:
        raise RecordError(f"{path}: no request records")
    return outputs


# ---------------------------------------------------------------------- results


def write_result(path: str | os.PathLike, result: Result) -> None:
    _write_valid("result", path, result.to_dict())


def set_aside_unreadable_result(path: str | os.PathLike) -> str | None:
    """Move a result file that is not JSON (cut short by a full disk or a copy) to
    `result.json.unreadable` beside it, so that the workflow sees the cell's result missing and
    reruns it; returns a line saying so, or None for a readable or missing file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        _read_json(path)
    except RecordError as err:
        aside = path.with_name(path.name + ".unreadable")
        path.replace(aside)
        return f"{err}; moved to {aside.name}, so the cell reruns"
    return None


def result_from_dict(data: Any, source: str) -> Result:
    validate("result", data, source)
    return Result.from_dict(data)


def read_result(path: str | os.PathLike) -> Result:
    """A result file, validated, as the typed result (its cell is `Result.config`)."""
    return Result.from_dict(_read_valid("result", path))


# ---------------------------------------------------------------- interruptions


def write_interrupted(out_dir: str | os.PathLike, cell_id: str, signal: str, phase: str, at: str) -> None:
    """`interrupted.json` in the cell's folder: the signal that stopped it and the phase it was in."""
    record = {"cell_id": cell_id, "status": Status.INTERRUPTED.value, "signal": signal, "phase": phase, "at": at}
    _write_valid("interrupted", Path(out_dir) / INTERRUPTED, record)


def read_interrupted(path: str | os.PathLike) -> dict:
    return _read_valid("interrupted", path)


# ---------------------------------------------------------------- power samples


def write_power_samples(path: str | os.PathLike, rows: Iterable[tuple]) -> None:
    """Rows of (*POWER_KEYS, *POWER_FIELDS) values, None written empty."""
    with atomic_open(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow((*POWER_KEYS, *POWER_FIELDS))
        for number, row in enumerate(rows, start=2):
            if len(row) != len(POWER_KEYS) + len(POWER_FIELDS):
                raise RecordError(f"{path}:{number}: {len(row)} values for {len(POWER_KEYS) + len(POWER_FIELDS)} columns")
            writer.writerow("" if value is None else value for value in row)


def read_power_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The samples' POWER_KEYS: `t_s` and `power_w` as numbers (`power_w` None where empty),
    `phase` (`idle`, `window` or empty) and `device` as text."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = sorted(set(POWER_KEYS) - set(reader.fieldnames or ()))
            if missing:
                raise RecordError(f"{path}: missing column(s) {missing}")
            return [_power_sample(path, number, row) for number, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RecordError(f"{path}: cannot read power samples: {err}") from None


def _power_sample(path: Path, number: int, row: dict[str, str | None]) -> dict[str, Any]:
    def value(key: str) -> float | None:
        text = row[key]
        if key == "power_w" and not text:
            return None  # a device that does not report power
        try:
            number_ = float(text)
        except (TypeError, ValueError):
            raise RecordError(f"{path}:{number}: {key} is not a number: {text!r}") from None
        if not math.isfinite(number_):
            raise RecordError(f"{path}:{number}: {key} is not finite: {text!r}")
        return number_

    return {"t_s": value("t_s"), "phase": row["phase"], "device": row["device"], "power_w": value("power_w")}
