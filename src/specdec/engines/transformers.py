"""The transformers engine: transformers' own `generate()`, plain, assisted (a draft model) or
prompt lookup, on the models loaded in this process (`InProcessEngine`), measured the same way
as our engine (a streamer timestamps each chunk of tokens as it reaches the host) and returned
as the same `RowResult`s. Its drafts run at batch size 1 only.

transformers makes each verification's tokens one streamer chunk, so a chunk is one target
forward and its size minus one is the number of accepted draft tokens (after transformers' own
cut at EOS or the length limit). Draft lengths are counted by wrapping the candidate
generator's `get_candidates` for the duration of the call. transformers verifies the first
draft together with the prompt, so a peer's first emission may hold several tokens.
"""

from __future__ import annotations

import copy
import time
from typing import ClassVar

import torch
from transformers.generation import BaseStreamer

from specdec.decoding import GenerationSettings, RowResult
from specdec.engines.inprocess import InProcessEngine
from specdec.gate.cells import Cell
from specdec.job.attribution import GENERATE_ACCEPTS
from specdec.metadata import package_version


class _ChunkTimer(BaseStreamer):
    """Timestamps every chunk of new tokens; `generate()` first puts the prompt, which is skipped."""

    def __init__(self, batch: int):
        self.batch = batch
        self.prompt_seen = False
        self.chunks: list[tuple[int, list[list[int]]]] = []

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter_ns()  # `generate()` moved the tokens to the host before put()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.chunks.append((now, value.reshape(self.batch, -1).tolist()))

    def end(self) -> None:
        pass


def _count_drafts(model, drafted: list[int]):
    """Wrap `model`'s candidate generator so each proposal's length is appended to `drafted`;
    returns a function that removes the wrapper."""
    original = model._get_candidate_generator

    def counting_generator(*args, **kwargs):
        generator = original(*args, **kwargs)
        get_candidates = generator.get_candidates

        def counted(input_ids, *a, **kw):
            candidates, logits = get_candidates(input_ids, *a, **kw)
            drafted.append(candidates.shape[1] - input_ids.shape[1])
            return candidates, logits

        generator.get_candidates = counted
        return generator

    model._get_candidate_generator = counting_generator
    return lambda: delattr(model, "_get_candidate_generator")


def _row_result(chunks, row: int, drafted: list[int] | None, settings: GenerationSettings) -> RowResult:
    result = RowResult.empty(settings.gamma if drafted is not None else 0)
    for step, (now, tokens) in enumerate(chunks):
        if drafted is not None:
            result.count_draft(drafted[step], drafted[step], len(tokens[row]) - 1)  # chains: nodes = depth
        if result.emit(tokens[row], now, settings):
            break
    return result


def hf_generate(
    target,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    assistant_model=None,
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None,
    **generate_kwargs,
) -> list[RowResult]:
    """transformers `generate()` on a left-padded batch: plain (AR), assisted by
    `assistant_model` (gamma draft tokens every step: schedule "constant", confidence threshold
    0, as transformers 5 defaults to 20 tokens and an adaptive threshold), or prompt lookup
    with `prompt_lookup_num_tokens` draft tokens after a match of up to
    `max_matching_ngram_size` tokens. Drafting runs batch size 1 only
    (`TransformersEngine.max_drafting_batch`). Seed sampling with `torch.manual_seed`. `generate_kwargs` go to
    `generate()` as they are (bench: `cache_implementation="static"`)."""
    batch = input_ids.shape[0]
    speculative = assistant_model is not None or prompt_lookup_num_tokens is not None
    kwargs = dict(
        attention_mask=attention_mask,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.temperature > 0,
        pad_token_id=settings.pad_token_id,
        eos_token_id=list(settings.eos_token_ids) or None,
        **generate_kwargs,
    )
    if settings.temperature > 0:
        # Explicit values: an unset top_k falls back to transformers' global default of 50.
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    drafted: list[int] | None = [] if speculative else None
    saved_config = None
    if assistant_model is not None:
        saved_config = assistant_model.generation_config
        fixed = copy.deepcopy(saved_config)
        fixed.num_assistant_tokens = settings.gamma
        fixed.num_assistant_tokens_schedule = "constant"
        fixed.assistant_confidence_threshold = 0.0
        assistant_model.generation_config = fixed
        kwargs["assistant_model"] = assistant_model
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        if max_matching_ngram_size is not None:
            kwargs["max_matching_ngram_size"] = max_matching_ngram_size
    timer = _ChunkTimer(batch)
    unwrap = _count_drafts(target, drafted) if speculative else None
    try:
        with torch.inference_mode():
            target.generate(input_ids, streamer=timer, **kwargs)
    finally:
        if unwrap is not None:
            unwrap()
        if saved_config is not None:
            assistant_model.generation_config = saved_config
    return [_row_result(timer.chunks, row, drafted, settings) for row in range(batch)]


def transformers_settings(cell: Cell) -> dict:
    """The drafting arguments of `generate()` (`hf_generate`) for the cell's method."""
    if cell.method == "speculative":
        return {"assistant_model": cell.drafter.name, "num_assistant_tokens": cell.gamma,
                "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
    if cell.method == "ngram":
        # transformers backs off from the longest context down to one token (no minimum).
        return {"prompt_lookup_num_tokens": cell.gamma, "max_matching_ngram_size": cell.drafter.n - 1}
    return {}


class TransformersEngine(InProcessEngine):
    name = "transformers"
    label = "transformers: "
    max_drafting_batch = 1
    drafting_batch_reason = "transformers' assisted generation and prompt lookup run batch size 1 only"
    # A decode step is a target forward that could verify drafts: transformers' prefill
    # verifies its first draft.
    prefill_verifies = True
    hidden_parts: ClassVar[dict[str, str]] = {"accept": GENERATE_ACCEPTS}

    @classmethod
    def version(cls) -> str:
        return package_version("transformers")

    @property
    def engine_settings(self) -> dict:
        return transformers_settings(self.cell)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator,
               recorder) -> list[RowResult]:
        """`generate()` never runs under our kernels (decoding.kernels); it samples with
        torch's global generator (seeded by `measure`)."""
        lookup = transformers_settings(self.cell)
        return hf_generate(self.target, input_ids, attention_mask, self.settings, assistant_model=self.drafter,
                           prompt_lookup_num_tokens=lookup.get("prompt_lookup_num_tokens"),
                           max_matching_ngram_size=lookup.get("max_matching_ngram_size"))
