"""Our engine (`specdec.decoding`): the reference the other engines' outputs are checked
against; the only one that runs a replay drafter, our CPU kernel choice and compiled steps."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

import specdec
from specdec.decoding import ModelDrafter, NgramDrafter, RecyclingDrafter, ReplayDrafter, RowResult, SuffixDrafter, generate
from specdec.decoding.compiled import compile_steps, step_widths
from specdec.decoding.head_formats import load_head
from specdec.decoding.trees import DynamicTree, TreeShape
from specdec.decoding.kernels import choose, tuned_linears
from specdec.engines.inprocess import InProcessEngine
from specdec.engines.session import load_models
from specdec.gate.cells import Cell, DynamicTreeSpec
from specdec.records import read_kernel_choice, read_reference_outputs

log = logging.getLogger("specdec.run")


@dataclass
class SpecdecEngine(InProcessEngine):
    name = "specdec"
    label = ""
    replays = True
    model_free_drafters = ("ngram", "suffix", "recycling")
    head_drafters = ("eagle3", "medusa")
    token_trees = True
    parity_reference = True

    kernels: dict = field(default_factory=dict)  # role -> the CPU kernel choice our engine runs it with
    compiled: dict = field(default_factory=dict)  # role -> how its steps run (decoding.compiled)
    replayed: dict | None = None  # a replay drafter's reference: request id -> AR output ids
    reference: Path | None = None  # the file they came from

    @classmethod
    def version(cls) -> str:
        return specdec.__version__

    @classmethod
    def kernel_setups(cls, cell: Cell) -> dict[str, tuple[str, str]]:
        """The float32 models our engine runs on the CPU. The choice is made per model, dtype
        and batch size, once for every cell of that setup."""
        if cell.placement.strategy != "cpu":
            return {}
        setups = {"target": (cell.target.name, cell.target.dtype)}
        if cell.drafter is not None and cell.drafter.kind != "quantized" and cell.drafter.model is not None:
            setups["drafter"] = (cell.drafter.model.name, cell.drafter.model.dtype)
        return {role: setup for role, setup in setups.items() if setup[1] == "float32"}

    @classmethod
    def open(cls, cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None,
             reference: Path | None = None) -> SpecdecEngine:
        """Place and load the target and the drafter named by the cell. `kernels`: the kernel
        choice file of a role of `kernel_setups(cell)`; a model without one is probed here.
        `reference`: the AR cell's requests.jsonl, required by a replay drafter."""
        replayed = None
        if cell.drafter is not None and cell.drafter.kind == "replay":
            if reference is None:
                raise ValueError(f"replay drafter {cell.drafter.name!r} needs the requests.jsonl of the AR cell it replays (--reference)")
            replayed = read_reference_outputs(reference)
        loaded = load_models(cell, models_dir)
        chosen = _apply_kernel_choices({"target": loaded.target, "drafter": loaded.drafter_model}, kernels or {})
        spec = cell.drafter
        tree = None
        if spec is not None and spec.tree:
            tree = DynamicTree(**dataclasses.asdict(spec.tree)) if isinstance(spec.tree, DynamicTreeSpec) else TreeShape.of(spec.tree)
        if replayed is not None:
            drafter = ReplayDrafter({}, spec.error_rate, spec.cost_ms_per_token / 1000, model=loaded.drafter_model, seed=cell.seed)
        elif cell.method == "speculative":
            drafter = ModelDrafter(loaded.drafter_model, tree=tree)
        elif cell.method == "ngram":
            drafter = NgramDrafter(n=spec.n, top_k=spec.top_k, min_context=spec.min_context, tree=tree)
        elif cell.method == "suffix":
            drafter = SuffixDrafter(spec.max_depth, spec.max_spec_factor, spec.min_token_prob, spec.cache_tokens, tree=tree)
        elif cell.method == "recycling":
            drafter = RecyclingDrafter(top_k=spec.top_k, tree=tree)
        elif spec is not None and spec.is_head:
            drafter = load_head(spec.source, loaded.target, spec.kind, tree)
        else:
            drafter = None
        return cls(cell, loaded.target, loaded.tokenizer, drafter, loaded.drafter_model, loaded.plan, loaded.settings,
                   rss_before_weights=loaded.rss_before_weights, kernels=chosen, replayed=replayed, reference=reference)

    @property
    def engine_settings(self) -> dict:
        settings = {"kernels": self.kernels} if self.kernels else {}
        drafter = self.drafter.state() if self.drafter is not None else {}  # what it kept across requests, and its cap
        return settings | ({"compile": self.compiled} if self.compiled else {}) | ({"drafter": drafter} if drafter else {})

    @property
    def timed_drafter(self):
        """The drafter's module whose forwards attribution times: a draft model, or a learned head."""
        return self.drafter.module if self.drafter is not None else None

    def begin_window(self) -> None:
        """Our drafters forget what they learnt from the warm-up (`Drafter.forget`)."""
        if self.drafter is not None:
            self.drafter.forget()

    def prepare(self, context: int, cache_dir: Path) -> None:
        """Our engine's step path per model: a model whose `compile` is on (absent: on for
        CUDA) gets a static cache of room for `context` tokens (the longest conversation's,
        `session.check_context`) plus one step, and its steps compiled for every shape now,
        before any request: chains' and, for a drafter that proposes token trees, the tree
        steps' (`Drafter.verify_widths`, `Drafter.draft_widths`); the others keep the growing
        cache. `cache_dir`: the compile cache shared by every cell."""
        roles = {}
        if self.drafter_model is not None:  # a quantised copy, or a model drafter's (or replay pacer's) own model
            spec = self.cell.drafter
            roles["drafter"] = (self.drafter_model, spec.compile if spec.kind == "quantized" else spec.model.compile)
        # The target's steps compile last: dynamo tries a shared forward's graphs newest first,
        # and an int8 drafter's (broken at each quantised linear) caught the target's steps
        # and compiled inside decoding when they came after (test_compiled).
        roles["target"] = (self.target, self.cell.target.compile)
        gamma = self.cell.gamma
        room = self.drafter.step_room(gamma) if self.drafter is not None else gamma + 1
        max_length = -(-(context + room) // 256) * 256  # shapes shared by cells of similar contexts
        for role, (model, wanted) in roles.items():
            device = model.get_input_embeddings().weight.device
            if wanted if wanted is not None else device.type == "cuda":
                hidden = {"target": self.drafter.hidden_ids} if role == "target" and self.drafter is not None else {}
                if self.drafter is None:
                    causal, tree = step_widths(gamma, role), []
                else:
                    causal, tree = self.drafter.verify_widths(gamma) if role == "target" else self.drafter.draft_widths(gamma)
                record = compile_steps(model, max_length, self.cell.batch_size, {role: causal}, cache_dir,
                                       hidden_ids=hidden, tree_widths={role: tree} if tree else None)
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

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator,
               recorder) -> list[RowResult]:
        return generate(self.target, input_ids, attention_mask, self.settings, drafter=self.drafter, generator=generator,
                        accept_timer=recorder.accept if recorder.enabled else None)

    def ar_copy(self) -> SpecdecEngine:
        return dataclasses.replace(super().ar_copy(), replayed=None)


def _apply_kernel_choices(models: dict, files: dict[str, Path]) -> dict:
    """Apply each role's kernel choice file (else probe it now, at one row: never inside a
    measured request); the record of what each model runs, for the result."""
    chosen = {}
    for role, model in models.items():
        if model is None:
            continue
        if role in files:
            choice = read_kernel_choice(files[role])
            choose(model, choice["weight_major"])
            chosen[role] = {"source": str(files[role]), "weight_major": choice["weight_major"], "batch_size": choice["batch_size"]}
        else:
            chosen[role] = {"source": "probed when the cell loaded (one row)"}
        chosen[role]["layers_weight_major"] = len(tuned_linears(model))
    log.info("CPU linear layers computed as W @ x.T (decoding kernels): %s", chosen)
    return chosen
