"""What the job asks of an engine (`Engine`), and what an engine declares it cannot run.

One rule for a combination an engine cannot run: the gate (`config`) refuses a setting that
no engine could run (a wrong key, an int8 copy of a bf16 target, an int8 drafter on a GPU);
a valid cell outside one engine's abilities (assisted generation above batch 1 on
transformers, a quantised copy of the target as vLLM's drafter) is a `not_supported` row, written by the job at once,
before any model loads, with the reason. So an engine x method matrix shows its gaps as
rows instead of being refused whole; `specdec check-config` lists them before a run. Each
engine class declares its gaps (the capabilities below); `Engine.unsupported` reads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from specdec.engines.placement import gpus_required
from specdec.gate.cells import HEAD_KINDS, MODEL_FREE_KINDS, Cell, DynamicTreeSpec
from specdec.job.load import Server


class NotSupported(Exception):
    """The installed engine refuses the cell's settings (recorded `not_supported`)."""


class Engine(ABC):
    """One engine running one cell. The job (`runner`, `measure`, `analysis`) asks, in order:
    `open` (locate, load and place the models, fix and check the settings; bad input raises
    before anything is written), `prepare` (warm up what must be ready before the first
    request), `start` (inside the recorded phase: a failure is a `failed` or `not_supported`
    cell), `recorder` and `server` (the request stream under the load generator: rows with
    their emissions), `begin_window` / `end_window` around the measured window, `counters`
    (the engine's own speculative counters over it), `memory`, and `close` (release).

    Besides `cell`, an opened engine has `plan` (where it runs: `describe()`), `tokenizer`,
    `prompt_ids` (request id -> prompt token ids), `device` (where inputs go),
    `context_limit`, `engine_settings` (the result's `engine.settings`) and `target` (a
    model to read the target's logits at a greedy divergence, `analysis`)."""

    name: ClassVar[str]  # the config's `engine` (cells.ENGINES, the schema's enum)
    label: ClassVar[str]  # before a method's name in tables and figures ("" for ours)

    # Capabilities, declared here and read by `unsupported` (a `not_supported` row) and by
    # the gate (`config`: the default and allowed references, replay drafters).
    replays: ClassVar[bool] = False  # runs a replay drafter (a measurement tool of our Drafter interface)
    model_free_drafters: ClassVar[tuple[str, ...]] = ("ngram",)  # the model-free drafter kinds it runs
    head_drafters: ClassVar[tuple[str, ...]] = ()  # the learned head kinds it runs (eagle3, medusa)
    token_trees: ClassVar[bool] = False  # verifies a drafter's static token tree (drafters.NAME.tree)
    # Else the head kinds whose static tree it hands to the engine, whose own check at start may
    # refuse it (vLLM's speculative_token_tree), and why any other tree is not its.
    static_tree_heads: ClassVar[tuple[str, ...]] = ()
    tree_reason: ClassVar[str] = "verifies chains here"
    max_drafting_batch: ClassVar[int | None] = None  # drafts at batch sizes up to this only (None: any)
    drafting_batch_reason: ClassVar[str] = ""
    placements: ClassVar[tuple[str, ...] | None] = None  # the placement strategies it runs (None: all)
    placement_reason: ClassVar[str] = ""
    quantized_drafters: ClassVar[bool] = True  # drafts with a quantised copy of the target
    interleaves: ClassVar[bool] = True  # decodes an interleaved AR reference in the cell's own job
    interleave_reason: ClassVar[str] = ""

    # What the job and the report make of its cells.
    parity_reference: ClassVar[bool] = False  # the other engines' greedy outputs are checked against its AR cells
    theory_applies: ClassVar[bool] = True  # its target forwards are counted per request (theory's draft lengths)
    prefill_verifies: ClassVar[bool] = False  # its prefill forward verifies the first draft (transformers)
    drafts_per_request: ClassVar[bool] = True  # its rows carry drafted/accepted counts (the `acceptance` block)
    needs_endpoint: ClassVar[bool] = False  # measures a running server: its cells carry the config's `openai` endpoint

    cell: Cell

    @classmethod
    def runs_in_vllm_environment(cls, cell: Cell) -> bool:
        """Whether the workflow runs the cell's job in vLLM's own environment (make install-vllm)."""
        return False

    @classmethod
    def gpus_required(cls, cell: Cell) -> int:
        """The GPUs the cell's job holds (Snakemake's `resources: gpu=`, the job's lease):
        its placement's."""
        return gpus_required(cell.placement, has_drafter=cell.drafter is not None)

    @classmethod
    def unsupported(cls, cell: Cell) -> str | None:
        """Why this engine cannot run the cell, or None."""
        drafter = cell.drafter
        if drafter is not None and drafter.kind == "replay" and not cls.replays:
            return (f"drafter {drafter.name!r} replays reference outputs through our engine's Drafter interface "
                    f"(a measurement tool); {cls.name} has no such drafter")
        if drafter is not None and drafter.kind in MODEL_FREE_KINDS and drafter.kind not in cls.model_free_drafters:
            return (f"drafter {drafter.name!r} ({drafter.kind}) runs through our engine's Drafter interface; "
                    f"{cls.name} has no such drafter here")
        if drafter is not None and drafter.tree is not None and not cls.token_trees and not (
                drafter.kind in cls.static_tree_heads and not isinstance(drafter.tree, DynamicTreeSpec)):
            return f"drafter {drafter.name!r} drafts a token tree; {cls.name} {cls.tree_reason}"
        if drafter is not None and drafter.kind in HEAD_KINDS and drafter.kind not in cls.head_drafters:
            return f"drafter {drafter.name!r} is a learned {drafter.kind} head; {cls.name} runs no such head here"
        if cls.max_drafting_batch is not None and cell.drafts and cell.batch_size > cls.max_drafting_batch:
            return f"{cls.drafting_batch_reason}; batch_size is {cell.batch_size}"
        if cls.placements is not None and cell.placement.strategy not in cls.placements:
            return f"{cls.placement_reason}; placement {cell.placement.strategy!r} is our engine's"
        if drafter is not None and drafter.kind == "quantized" and not cls.quantized_drafters:
            return cls.quantized_drafter_reason(cell)
        return None

    @classmethod
    def quantized_drafter_reason(cls, cell: Cell) -> str:
        """Why a quantised copy of the target cannot draft (only where `quantized_drafters` is False)."""
        raise NotImplementedError

    @classmethod
    def kernel_setups(cls, cell: Cell) -> dict[str, tuple[str, str]]:
        """The models whose CPU kernel choice (decoding.kernels) the cell depends on, by role:
        (model name, dtype). None unless the engine runs our kernels."""
        return {}

    @classmethod
    @abstractmethod
    def version(cls) -> str:
        """The engine's version, for the result."""

    @classmethod
    def result_block(cls, settings: dict) -> dict:
        """The result's `engine`: what ran the cell, its version, and what it was given."""
        return {"name": cls.name, "version": cls.version(), "settings": settings}

    @classmethod
    @abstractmethod
    def open(cls, cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None,
             reference: Path | None = None) -> Engine:
        """Locate (and for an in-process engine load and place) the models; nothing runs yet.
        `kernels`: the kernel choice file of each role of `kernel_setups(cell)`;
        `reference`: the AR cell's requests.jsonl, which a replay drafter replays."""

    @property
    @abstractmethod
    def engine_settings(self) -> dict:
        """What the engine is given beyond the cell (the result's `engine.settings`)."""

    @property
    def window_device(self) -> str:
        """Where the engine's work finishes as this process sees it: the power window's edges
        wait for that device."""
        return self.device

    def prepare(self, context: int, cache_dir: Path) -> None:
        """Warm up what must be ready before the first request, for conversations of up to
        `context` tokens; `cache_dir` is shared by every cell. Nothing by default."""

    def start(self, out_dir: Path) -> None:
        """Start the engine; a process it starts keeps its log in the cell's `out_dir`.
        Nothing by default: the models are loaded already."""

    @abstractmethod
    def recorder(self):
        """The cell's time attribution recorder (`attribution`)."""

    @abstractmethod
    def server(self, recorder) -> Server:
        """The engine as the load generator drives it, timed by `recorder`."""

    def begin_window(self) -> None:
        """The measured window begins (after the warm-up)."""

    def end_window(self) -> None:
        """The measured window has ended."""

    def counters(self) -> dict | None:
        """The engine's own speculative-decoding counters over the window, or None where the
        drafts are counted per request only."""
        return None

    def served(self) -> dict | None:
        """What the engine reports of the requests beyond their records (the result's
        `served`: a server's failed requests), or None."""
        return None

    def memory(self) -> dict | None:
        """Peak memory against what the models need (the result's `memory`), or None where
        the engine's memory is not this process's."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the models (stop the engine)."""
