"""The text a learned head is trained on: offline corpora rendered as the target reads them,
cut into held-out and training sequences, and refused where it shares a prompt with any
evaluation dataset of the experiments that use the head.

Sources (`SOURCES`, the schema's `train.corpus` choices): chitchat-dataset's conversations as chats (the first
sender is the user), and the Python standard library's modules as answers in a code block
(the evaluation's code prompts are HumanEval's, which the standard library does not hold);
`responses`, the target's own greedy answers to chitchat's opening messages and to requests
for standard-library functions (signature and docstring), written in batches as the budget
asks (the text a drafter meets when it decodes, at a generation's price); or a user's JSONL
file of {"text": ...} lines, taken as they are. Documents are shuffled by the seed within
each source and interleaved across sources, so that any budget sees each.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import time
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Callable, Iterator

import torch

from specdec.gate.cells import HeadTraining
from specdec.prepare.datasets import package_file

# A corpus line or message shorter than this is too common to count as sharing a prompt
# ("Thanks!", a blank docstring line); evaluation prompts are longer.
MIN_SHARED_CHARS = 40
# Standard library modules are cut into pieces of this many lines: one answer each.
STDLIB_LINES = 80
# The target writes its answers (source `responses`) this many prompts at a time, each at
# most this many tokens (most of SmolLM2's answers end well before).
ANSWER_BATCH = 32
ANSWER_TOKENS = 160
_WORDS = re.compile(r"\s+")


class TrainingDataError(ValueError):
    """A training set that cannot be read, or shares a prompt with an evaluation dataset."""


@dataclass(frozen=True)
class Document:
    """One training text: where it comes from, the text as the target reads it, and the
    passages that must not appear in an evaluation prompt (what a user would have typed)."""

    source: str
    id: str
    text: str
    passages: tuple[str, ...]


def documents(training: HeadTraining, tokenizer, target, seed: int) -> Iterator[Document]:
    """The training documents in training order (see the module's docstring), made as they
    are consumed (a `responses` answer is written only when the budget reaches it)."""
    if training.path is not None:
        yield from _jsonl_documents(Path(training.path))
        return
    rng = random.Random(seed)
    sources = [SOURCES[name](tokenizer, target, rng) for name in training.corpus]
    for group in zip_longest(*sources):
        yield from (doc for doc in group if doc is not None)


def _shuffled(source: Callable[..., Iterator[Document]]):
    """An offline source as SOURCES takes it: its documents in the seed's order."""
    def documents_in_order(tokenizer, target, rng: random.Random) -> Iterator[Document]:
        docs = list(source(tokenizer))
        rng.shuffle(docs)
        return iter(docs)
    return documents_in_order


def _chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _chitchat_conversations(source: str) -> dict:
    """chitchat-dataset's conversations by id (the wheel's dataset.json), for corpus `source`."""
    path = package_file("chitchat_dataset", "dataset.json", f"training on {source} needs the chitchat-dataset package "
                         "(pip install chitchat-dataset)")
    return json.loads(path.read_text())


def _stdlib_modules() -> Iterator[tuple[Path, str]]:
    """The Python standard library's top-level modules and their source, by file name."""
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield path, path.read_text(errors="replace")


def _chitchat_documents(tokenizer) -> Iterator[Document]:
    for key, conversation in _chitchat_conversations("chitchat").items():
        senders: dict[str, str] = {}
        messages = []
        for group in conversation["messages"]:
            for message in group:
                text = message["text"].strip()
                role = senders.setdefault(message["sender"], ("user", "assistant")[len(senders) % 2])
                if not text:
                    continue
                if messages and messages[-1]["role"] == role:
                    messages[-1]["content"] += "\n" + text
                else:
                    messages.append({"role": role, "content": text})
        if len(messages) >= 2:
            yield Document("chitchat", key, _chat(tokenizer, messages), tuple(m["content"] for m in messages))


def _stdlib_documents(tokenizer) -> Iterator[Document]:
    for path, source in _stdlib_modules():
        lines = source.splitlines()
        for start in range(0, len(lines), STDLIB_LINES):
            piece = "\n".join(lines[start : start + STDLIB_LINES]).strip()
            if not piece:
                continue
            messages = [{"role": "user", "content": f"Show lines {start + 1}-{start + STDLIB_LINES} of Python's {path.stem} module."},
                        {"role": "assistant", "content": f"```python\n{piece}\n```"}]
            yield Document("python_stdlib", f"{path.name}:{start + 1}", _chat(tokenizer, messages), (piece,))


def _answer_prompts() -> Iterator[tuple[str, str]]:
    """(id, user message) prompts the target answers: chitchat's opening messages, and requests
    for the standard library's documented functions."""
    for key, conversation in _chitchat_conversations("responses").items():
        opening = next((m["text"].strip() for group in conversation["messages"] for m in group if m["text"].strip()), None)
        if opening:
            yield f"chitchat:{key}", opening
    for path, source in _stdlib_modules():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and len(doc) >= MIN_SHARED_CHARS:
                body = "\n".join(f"    {line}" for line in doc.replace('"""', "'''").splitlines())
                yield (f"{path.name}:{node.lineno}", "Write this Python function. Give the full function in a Python code block."
                       f'\n\n```python\ndef {node.name}({ast.unparse(node.args)}):\n    """\n{body}\n    """\n```')


def responses(tokenizer, target, rng: random.Random, batch: int = ANSWER_BATCH,
              max_tokens: int = ANSWER_TOKENS) -> Iterator[Document]:
    """The target's greedy answers to `_answer_prompts` in the seed's order, `batch` at a time,
    each document the chat with its answer (the prompt is what must not be an evaluation's)."""
    prompts = list(_answer_prompts())
    rng.shuffle(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = target.generation_config.eos_token_id
    stops = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
                 for _, text in group]
        tokens, mask = next(batches([tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats], batch, pad))
        with torch.no_grad():
            out = target.generate(input_ids=tokens.to(target.device), attention_mask=mask.to(target.device),
                                  max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        for (key, text), chat, row in zip(group, chats, out[:, tokens.shape[1] :].tolist()):
            ends = [i for i, token in enumerate(row) if token in stops]
            answer = row[: ends[0] + 1] if ends else row
            yield Document("responses", key, chat + tokenizer.decode(answer), (text,))


# Text a head may be trained on, each a function (tokenizer, target, rng) of documents in
# training order: chitchat-dataset's conversations (a wheel), the Python standard library's
# own source (on every machine with Python), for code prompts; the target's own answers.
SOURCES = {"chitchat": _shuffled(_chitchat_documents), "python_stdlib": _shuffled(_stdlib_documents), "responses": responses}


def _jsonl_documents(path: Path) -> Iterator[Document]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingDataError(f"{path}: cannot read the training texts: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingDataError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise TrainingDataError(f"{path}:{number}: expected an object with a non-empty string 'text'")
        yield Document("path", f"{path.name}:{number}", record["text"], (record["text"],))


def check_no_overlap(docs: list[Document], prompts: dict[str, list[dict]]) -> None:
    """Refuse training text that shares a prompt with an evaluation dataset (`prompts`:
    dataset name -> its prompt records): a passage of a document inside a prompt's turn, or a
    turn inside a document (whitespace-normalised, passages of MIN_SHARED_CHARS or more)."""
    turns = [(name, record["id"], _normalised(turn)) for name, records in prompts.items() for record in records
             for turn in record["turns"]]
    for doc in docs:
        text = _normalised(doc.text)
        for name, request, turn in turns:
            shared = len(turn) >= MIN_SHARED_CHARS and turn in text
            shared = shared or any(len(p) >= MIN_SHARED_CHARS and p in turn for p in map(_normalised, doc.passages))
            if shared:
                raise TrainingDataError(f"training text {doc.source} {doc.id} shares a prompt with evaluation dataset "
                                        f"{name!r} (request {request}): a head is never trained on what it is measured on")


def _normalised(text: str) -> str:
    return _WORDS.sub(" ", text).strip()


@dataclass
class Split:
    """The corpus as token sequences: the held-out ones first (evaluated, never trained on),
    then the training ones, up to the budget; `documents`: how many documents each used;
    `seconds`: the time making them took (the target writing its answers, most of it)."""

    held_out: list[list[int]]
    training: list[list[int]]
    documents: dict[str, int]
    seconds: float


def split(training: HeadTraining, tokenizer, target, seed: int, prompts: dict[str, list[dict]]) -> Split:
    """Tokenise documents into sequences of at most `sequence_tokens` until the held-out and
    the training budgets are met, checking every document used against the prompts."""
    held_out: list[list[int]] = []
    trained: list[list[int]] = []
    used: list[Document] = []
    held, budget = 0, 0
    started = time.monotonic()
    for doc in documents(training, tokenizer, target, seed):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        used.append(doc)
        for start in range(0, len(ids), training.sequence_tokens):
            piece = ids[start : start + training.sequence_tokens]
            if len(piece) < 2:
                continue
            if held < training.held_out_tokens:
                held_out.append(piece)
                held += len(piece)
            else:
                trained.append(piece)
                budget += len(piece)
        if budget >= training.tokens:
            break
    check_no_overlap(used, prompts)
    if not trained:
        raise TrainingDataError(f"the training texts hold {held} tokens, all taken by the held-out split "
                                f"(held_out_tokens {training.held_out_tokens}): give more text or fewer held-out tokens")
    counts: dict[str, int] = {}
    for doc in used:
        counts[doc.source] = counts.get(doc.source, 0) + 1
    return Split(held_out, trained, counts, time.monotonic() - started)


def batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, attention mask) batches of `batch_size` sequences, left-padded, in order."""
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        width = max(map(len, group))
        tokens = torch.tensor([[pad_id] * (width - len(s)) + s for s in group])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in group])
        yield tokens, mask


def token_count(sequences: list[list[int]]) -> int:
    return sum(map(len, sequences))


def all_tokens(sequences: list[list[int]]) -> torch.Tensor:
    return torch.tensor(list(chain.from_iterable(sequences)), dtype=torch.long)

