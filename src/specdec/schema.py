"""Validate result files against the result schema (also linked as workflow/schemas/result.schema.json)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

RESULT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "result.schema.json"


class ResultSchemaError(ValueError):
    """A result that breaks the schema; the message starts with the JSON path at fault."""


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    if not RESULT_SCHEMA.is_file():
        raise FileNotFoundError(f"result schema not found at {RESULT_SCHEMA}")
    schema = json.loads(RESULT_SCHEMA.read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate_result(result: dict, source: str = "result") -> None:
    """Raise ResultSchemaError naming the JSON path of the most relevant violation."""
    error = best_match(_validator().iter_errors(result))
    if error is not None:
        raise ResultSchemaError(f"{source}: {error.json_path}: {error.message}")
