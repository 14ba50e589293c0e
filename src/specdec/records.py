"""The file contract between jobs: prompt, cell, request and result records, their schemas
and the status enum. Writers validate before they write, readers after they read, against the same
schema (`schemas/*.schema.json`); every file is written atomically (`specdec.io`)."""

from __future__ import annotations

import enum
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

from specdec.cells import Cell
from specdec.io import write_json, write_jsonl

RESULT_SCHEMA_VERSION = 4
# An interleaved cell's AR requests, beside its requests.jsonl (same schema, `request`).
INTERLEAVED_REQUESTS = "reference_requests.jsonl"


class Status(str, enum.Enum):
    """How a cell ended. `interrupted` cells write only `interrupted.json` (they rerun)."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_SUPPORTED = "not_supported"  # the engine cannot run this setting (a row of its own)


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


# -------------------------------------------------------------- kernel choices


def write_kernel_choice(path: str | os.PathLike, choice: dict) -> None:
    validate("kernels", choice, str(path))
    write_json(path, choice)


def read_kernel_choice(path: str | os.PathLike) -> dict:
    path = Path(path)
    choice = _read_json(path)
    validate("kernels", choice, str(path))
    return choice


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


def write_result(path: str | os.PathLike, result: dict) -> None:
    validate("result", result, str(path))
    write_json(path, result)


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


def read_result(path: str | os.PathLike) -> tuple[dict, Cell]:
    """A result file and its cell, both validated."""
    path = Path(path)
    result = _read_json(path)
    validate("result", result, str(path))
    return result, Cell.from_dict(result["config"])
