"""Place and load what an in-process cell decodes with: the placement plan, the target, the
drafter's model, the generation settings; the chat context of a request; and the check that
every conversation fits the models' context (`session`: an opened engine)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from specdec.decoding import GenerationSettings, check_same_vocabulary
from specdec.engines.placement import ModelInfo, PlacementPlan, model_info, plan_placement, resolve_local_gpus
from specdec.gate.cells import Cell, ModelSpec
from specdec.job.load import Request
from specdec.prepare import models


class ContextTooLong(ValueError):
    """A conversation and its new tokens do not fit a model's context window."""


@dataclass
class Models:
    """The target and the drafter's model of an in-process cell, placed and loaded."""

    target: object
    tokenizer: object
    drafter_model: object | None  # a quantised copy of the target, or a model drafter's (or replay pacer's) own model
    plan: PlacementPlan
    settings: GenerationSettings
    rss_before_weights: int | None = None  # bytes: interpreter, libraries and tokenizer


def generation_settings(cell: Cell, eos_token_ids=(), pad_token_id: int = 0) -> GenerationSettings:
    g = cell.generation
    return GenerationSettings(
        max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
        gamma=cell.gamma, eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
    )


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None where /proc is absent."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def kernel_choice_name(model: str, dtype: str, batch_size: int) -> str:
    """The file name of a kernel choice (under results/kernels/)."""
    return f"{model}--{dtype}--b{batch_size}.json"


def _drafter_dtype(cell: Cell) -> str:
    """The dtype the drafter's model loads in (an int8 copy is quantised after loading)."""
    drafter = cell.drafter
    if drafter.kind != "quantized":
        return drafter.model.dtype
    return {"bf16": "bfloat16", "int8": "float32"}[drafter.dtype]


def load_models(cell: Cell, models_dir: Path) -> Models:
    """Place and load the target and the drafter's model named by the cell (an int8 drafter
    is a dynamic quantisation of the loaded target)."""
    drafter_spec = cell.drafter_model
    int8 = cell.drafter is not None and cell.drafter.dtype == "int8"

    def info(spec: ModelSpec, dtype: str) -> ModelInfo:
        location, load_kwargs = models.model_location(spec, models_dir)
        return model_info(location, dtype, spec.name, **load_kwargs)

    plan = plan_placement(
        cell.placement,
        resolve_local_gpus(),
        info(cell.target, cell.target.dtype),
        info(drafter_spec, _drafter_dtype(cell)) if drafter_spec else None,
    )
    baseline = {}
    target, tokenizer = models.load_model(cell.target, models_dir, **plan.target.load_kwargs(),
                                          before_weights=lambda: baseline.setdefault("rss", rss_bytes()))
    drafter_model = None
    if int8:
        drafter_model = models.quantized_copy(target, "int8")
    elif drafter_spec:
        drafter_model, drafter_tokenizer = models.load_model(drafter_spec, models_dir, dtype=_drafter_dtype(cell), **plan.drafter.load_kwargs())
        check_same_vocabulary(target, drafter_model, tokenizer, drafter_tokenizer)
    settings = generation_settings(cell, _eos_ids(target, tokenizer), tokenizer.pad_token_id)
    return Models(target, tokenizer, drafter_model, plan, settings, rss_before_weights=baseline.get("rss"))


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def chat_messages(request) -> list[dict]:
    """The chat context of one turn: earlier turns carry the model's own answers."""
    conversation = request.conversation
    messages = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
    for user, answer in zip(conversation["turns"], request.history):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer["output_text"]}]
    messages.append({"role": "user", "content": request.message})
    return messages


def check_context(session, prompts: list[dict]) -> int:
    """Every conversation must fit the models' context: its templated turns plus
    max_new_tokens for each answer. Known before decoding, so it is bad input. Returns the
    longest conversation's context (prompt and answers, in tokens)."""
    limit, new_tokens = session.context_limit, session.cell.generation.max_new_tokens
    longest = 0
    for conversation in prompts:
        turns = len(conversation["turns"])
        # The last turn's context, its earlier answers left empty: they add at most new_tokens each.
        last = Request(conversation, turn=turns, history=({"output_text": ""},) * (turns - 1))
        prompt = len(session.tokenizer.apply_chat_template(chat_messages(last), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        longest = max(longest, prompt + turns * new_tokens)
        if limit is not None and prompt + turns * new_tokens > limit:
            raise ContextTooLong(
                f"request {last.request_id}: {prompt} prompt tokens + {turns} x max_new_tokens {new_tokens} = "
                f"{prompt + turns * new_tokens} tokens exceed the models' context of {limit}"
            )
    return longest
