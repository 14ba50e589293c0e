"""The engines that run a cell, by name: each is one class in a module of its own (the
`Engine` seam, `engines.base`); adding one is docs/engines.md's checklist."""

from __future__ import annotations

from pathlib import Path

from specdec.engines.base import Engine, NotSupported
from specdec.engines.openai import OpenAIEngine
from specdec.engines.specdec import SpecdecEngine
from specdec.engines.transformers import TransformersEngine
from specdec.engines.vllm import VllmEngine
from specdec.gate.cells import Cell

REGISTRY: dict[str, type[Engine]] = {engine.name: engine for engine in (SpecdecEngine, TransformersEngine, VllmEngine, OpenAIEngine)}
# The engine whose greedy AR outputs every other engine's are checked against (parity).
REFERENCE = next(name for name, engine in REGISTRY.items() if engine.parity_reference)

__all__ = ["REFERENCE", "REGISTRY", "Engine", "NotSupported", "engine_class", "kernel_setups", "open_engine", "unsupported"]


def engine_class(name: str) -> type[Engine]:
    """The class of the engine named `name` (a name the gate accepted)."""
    return REGISTRY[name]


def unsupported(cell: Cell) -> str | None:
    """Why the cell's engine cannot run it, or None."""
    return REGISTRY[cell.engine].unsupported(cell)


def kernel_setups(cell: Cell) -> dict[str, tuple[str, str]]:
    """The models whose CPU kernel choice the cell depends on, by role (empty unless its
    engine runs our kernels)."""
    return REGISTRY[cell.engine].kernel_setups(cell)


def open_engine(cell: Cell, models_dir: Path, kernels: dict[str, Path] | None = None,
                reference: Path | None = None) -> Engine:
    """The cell's engine, opened (`Engine.open`): models located, loaded where in-process,
    settings fixed and checked, nothing started."""
    return REGISTRY[cell.engine].open(cell, models_dir, kernels, reference)
