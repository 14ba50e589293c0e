"""Place and load what a cell decodes with: the placement plan, the target, the drafter, the
generation settings; and the check that every conversation fits the models' context."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from specdec import models, placement
from specdec.cells import Cell, ModelSpec

log = logging.getLogger("specdec.run")


class ContextTooLong(ValueError):
    """A conversation and its new tokens do not fit a model's context window."""


@dataclass
class Session:
    """Everything a cell decodes with, loaded once."""

    cell: Cell
    target: object
    tokenizer: object
    drafter: object | None  # a decoding Drafter, or generate()'s assistant model (engine transformers)
    drafter_model: object | None
    plan: placement.PlacementPlan
    settings: object  # decoding.GenerationSettings
    rss_before_weights: int | None = None  # bytes: interpreter, libraries and tokenizer
    prompt_ids: dict = field(default_factory=dict)  # request id -> unpadded prompt token ids
    kernels: dict = field(default_factory=dict)  # role -> the CPU kernel choice our engine runs it with
    compiled: dict = field(default_factory=dict)  # role -> how its steps run (decoding.compiled)
    replayed: dict | None = None  # a replay drafter's reference: request id -> AR output ids
    reference: Path | None = None  # the file they came from

    @property
    def device(self) -> str:
        return self.plan.target.input_device

    @property
    def context_limit(self) -> int | None:
        """The shortest context window of the models (max_position_embeddings)."""
        limits = [getattr(m.config, "max_position_embeddings", None) for m in (self.target, self.drafter_model) if m is not None]
        return min((limit for limit in limits if limit), default=None)

    @property
    def engine_settings(self) -> dict:
        """What the engine is given beyond the cell (the result's `engine.settings`)."""
        from specdec.engines import transformers_settings

        if self.cell.engine == "transformers":
            return transformers_settings(self.cell)
        settings = {"kernels": self.kernels} if self.kernels else {}
        drafter = self.drafter.state() if self.drafter is not None else {}  # what it kept across requests, and its cap
        return settings | ({"compile": self.compiled} if self.compiled else {}) | ({"drafter": drafter} if drafter else {})

    def prepare_steps(self, context: int, cache_dir: Path) -> None:
        """Our engine's step path per model: a model whose `compile` is on (absent: on for
        CUDA) gets a static cache of room for `context` tokens (the longest conversation's,
        `check_context`) plus one step, and its steps compiled for every shape now, before
        any request; the others keep the growing cache. `cache_dir`: the compile cache shared
        by every cell."""
        from specdec.decoding.compiled import compile_steps, step_widths

        if self.cell.engine != "specdec":
            return
        roles = {"target": (self.target, self.cell.target.compile)}
        if self.drafter_model is not None:  # a quantised copy, or a model drafter's (or replay pacer's) own model
            spec = self.cell.drafter
            roles["drafter"] = (self.drafter_model, spec.compile if spec.kind == "quantized" else spec.model.compile)
        max_length = -(-(context + self.cell.gamma + 1) // 256) * 256  # shapes shared by cells of similar contexts
        for role, (model, wanted) in roles.items():
            device = model.get_input_embeddings().weight.device
            if wanted if wanted is not None else device.type == "cuda":
                record = compile_steps(model, max_length, self.cell.batch_size, {role: step_widths(self.cell.gamma, role)}, cache_dir)
                log.info("%s: steps compiled in %.1f s (%s)", role, record["compile_s"], record)
            else:
                record = {"enabled": False, "static_cache": False}
            self.compiled[role] = record

    def register_prompt(self, request_id: str, prompt_ids: list[int]) -> None:
        """Record a request's prompt ids; a replay drafter learns that prompt's reference
        continuation, which the reference must hold."""
        self.prompt_ids[request_id] = prompt_ids
        if self.replayed is None:
            return
        if request_id not in self.replayed:
            raise ValueError(f"replay drafter {self.cell.drafter.name!r}: the reference {self.reference} has no request {request_id!r} "
                             "(it must be the AR cell of the same prompts, load and warm-up)")
        self.drafter.continuations[tuple(prompt_ids)] = self.replayed[request_id]

    def start(self) -> None:
        """The models are loaded already (`load_session`): bad input is found before the job
        writes anything."""

    def begin_window(self) -> None:
        """Our engine and transformers count drafts per request: no engine counters to read
        around the measured window (vLLM's session reads its own). Our drafters forget what
        they learnt from the warm-up (`Drafter.forget`)."""
        if self.cell.engine == "specdec" and self.drafter is not None:
            self.drafter.forget()

    def end_window(self) -> None:
        """See `begin_window`."""

    def close(self) -> None:
        self.target = self.drafter = self.drafter_model = None


def open_session(cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None, reference: Path | None = None):
    """The session of the cell's engine: in-process models (ours, transformers) or vLLM.
    `reference`: the AR cell's requests.jsonl, which a replay drafter replays."""
    if cell.engine == "vllm":
        from specdec.vllm_engine import open_vllm_session

        return open_vllm_session(cell, models_dir)
    return load_session(cell, models_dir, kernels, reference)


def generation_settings(cell: Cell, eos_token_ids=(), pad_token_id: int = 0):
    from specdec.decoding import GenerationSettings

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


def kernel_setups(cell: Cell) -> dict[str, tuple[str, str]]:
    """The models whose CPU kernel choice (decoding.kernels) a cell depends on, by role:
    (model name, dtype) of the float32 models our engine runs on the CPU. The choice is
    made per model, dtype and batch size, once for every cell of that setup."""
    if cell.engine != "specdec" or cell.placement.strategy != "cpu":
        return {}
    setups = {"target": (cell.target.name, cell.target.dtype)}
    if cell.drafter is not None and cell.drafter.kind != "quantized" and cell.drafter.model is not None:
        setups["drafter"] = (cell.drafter.model.name, cell.drafter.model.dtype)
    return {role: setup for role, setup in setups.items() if setup[1] == "float32"}


def kernel_choice_name(model: str, dtype: str, batch_size: int) -> str:
    """The file name of a kernel choice (under results/kernels/)."""
    return f"{model}--{dtype}--b{batch_size}.json"


def _drafter_dtype(cell: Cell) -> str:
    """The dtype the drafter's model loads in (an int8 copy is quantised after loading)."""
    drafter = cell.drafter
    if drafter.kind != "quantized":
        return drafter.model.dtype
    return {"bf16": "bfloat16", "int8": "float32"}[drafter.dtype]


def load_session(cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None, reference: Path | None = None) -> Session:
    """Place and load the target and the drafter named by the cell. `kernels`: the kernel
    choice file of a role of `kernel_setups(cell)`; a model without one is probed here.
    `reference`: the AR cell's requests.jsonl, required by a replay drafter."""
    from specdec.decoding import ModelDrafter, NgramDrafter, RecyclingDrafter, ReplayDrafter, SuffixDrafter, check_same_vocabulary
    from specdec.records import read_reference_outputs

    replayed = None
    if cell.drafter is not None and cell.drafter.kind == "replay":
        if reference is None:
            raise ValueError(f"replay drafter {cell.drafter.name!r} needs the requests.jsonl of the AR cell it replays (--reference)")
        replayed = read_reference_outputs(reference)

    drafter_spec = cell.drafter_model
    int8 = cell.drafter is not None and cell.drafter.dtype == "int8"

    def info(spec: ModelSpec, dtype: str) -> placement.ModelInfo:
        location, load_kwargs = models.model_location(spec, models_dir)
        return placement.model_info(location, dtype, spec.name, **load_kwargs)

    plan = placement.plan_placement(
        cell.placement,
        placement.resolve_local_gpus(),
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
    # transformers' generate() never runs under our kernels (decoding.kernels)
    chosen = _apply_kernel_choices({"target": target, "drafter": drafter_model}, kernels or {}) if cell.engine == "specdec" else {}
    settings = generation_settings(cell, _eos_ids(target, tokenizer), tokenizer.pad_token_id)
    if cell.engine == "transformers":
        drafter = drafter_model  # prompt lookup needs none
    elif replayed is not None:
        spec = cell.drafter
        drafter = ReplayDrafter({}, spec.error_rate, spec.cost_ms_per_token / 1000, model=drafter_model, seed=cell.seed)
    elif cell.method == "speculative":
        drafter = ModelDrafter(drafter_model)
    elif cell.method == "ngram":
        spec = cell.drafter
        drafter = NgramDrafter(n=spec.n, top_k=spec.top_k, min_context=spec.min_context)
    elif cell.method == "suffix":
        spec = cell.drafter
        drafter = SuffixDrafter(spec.max_depth, spec.max_spec_factor, spec.min_token_prob, spec.cache_tokens)
    elif cell.method == "recycling":
        drafter = RecyclingDrafter(top_k=cell.drafter.top_k)
    else:
        drafter = None
    return Session(cell, target, tokenizer, drafter, drafter_model, plan, settings, rss_before_weights=baseline.get("rss"),
                   kernels=chosen, replayed=replayed, reference=reference)


def _apply_kernel_choices(models: dict, files: dict[str, Path]) -> dict:
    """Apply each role's kernel choice file (else probe it now, at one row: never inside a
    measured request); the record of what each model runs, for the result."""
    from specdec.decoding import kernels
    from specdec.records import read_kernel_choice

    chosen = {}
    for role, model in models.items():
        if model is None:
            continue
        if role in files:
            choice = read_kernel_choice(files[role])
            kernels.choose(model, choice["weight_major"])
            chosen[role] = {"source": str(files[role]), "weight_major": choice["weight_major"], "batch_size": choice["batch_size"]}
        else:
            chosen[role] = {"source": "probed when the cell loaded (one row)"}
        chosen[role]["layers_weight_major"] = len(kernels.tuned_linears(model))
    log.info("CPU linear layers computed as W @ x.T (decoding kernels): %s", chosen)
    return chosen


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


def check_context(session: Session, prompts: list[dict]) -> int:
    """Every conversation must fit the models' context: its templated turns plus
    max_new_tokens for each answer. Known before decoding, so it is bad input. Returns the
    longest conversation's context (prompt and answers, in tokens)."""
    from specdec.load import Request

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
