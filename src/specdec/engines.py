"""What each engine is given for a cell, and what it cannot run.

One rule for a combination an engine cannot run: the gate (`config`) refuses a setting that
no engine could run (a wrong key, an int8 copy of a bf16 target, an int8 drafter on a GPU);
a valid cell outside one engine's abilities (assisted generation above batch 1 on
transformers, a quantised copy of the target as vLLM's drafter) is a `not_supported` row, written by the job at once,
before any model loads, with the reason. So an engine x method matrix shows its gaps as
rows instead of being refused whole; `specdec check-config` lists them before a run.
"""

from __future__ import annotations

from specdec.cells import Cell

INSTALL_VLLM = "make install-vllm"


class NotSupported(Exception):
    """The installed engine refuses the cell's settings (recorded `not_supported`)."""


def unsupported(cell: Cell) -> str | None:
    """Why the cell's engine cannot run it, or None."""
    drafter = cell.drafter
    if cell.engine != "specdec" and drafter is not None and drafter.kind == "replay":
        return (f"drafter {drafter.name!r} replays reference outputs through our engine's Drafter interface "
                f"(a measurement tool); {cell.engine} has no such drafter")
    if cell.engine != "specdec" and drafter is not None and drafter.kind in ("suffix", "recycling"):
        return f"drafter {drafter.name!r} ({drafter.kind}) runs through our engine's Drafter interface; {cell.engine} has no such drafter here"
    if cell.engine == "transformers" and cell.drafts and cell.batch_size > 1:
        return (f"transformers' assisted generation and prompt lookup run batch size 1 only; "
                f"batch_size is {cell.batch_size}")
    if cell.engine == "vllm" and cell.placement.strategy not in ("cpu", "same"):
        return (f"vLLM places the drafter with the target (tensor parallel over the same GPUs); "
                f"placement {cell.placement.strategy!r} is our engine's")
    if cell.engine == "vllm" and drafter is not None and drafter.kind == "quantized":
        if drafter.dtype == "int8":
            return (f"vLLM drafts with a model it loads itself; drafter {drafter.name!r} is a dynamic int8 "
                    "quantisation that exists only as torch modules of our process")
        return (f"vLLM runs a draft model in the target's dtype ({cell.target.dtype}), so drafter "
                f"{drafter.name!r}, a {drafter.dtype} copy of the target, would be the target itself")
    return None


def transformers_settings(cell: Cell) -> dict:
    """The drafting arguments of `generate()` (`peers.hf_generate`) for the cell's method."""
    if cell.method == "speculative":
        return {"assistant_model": cell.drafter.name, "num_assistant_tokens": cell.gamma,
                "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
    if cell.method == "ngram":
        # transformers backs off from the longest context down to one token (no minimum).
        return {"prompt_lookup_num_tokens": cell.gamma, "max_matching_ngram_size": cell.drafter.n - 1}
    return {}


def engine_block(cell: Cell, settings: dict) -> dict:
    """The result's `engine`: what ran the cell, its version, and what it was given."""
    import specdec
    from specdec.metadata import package_version, vllm_version

    version = {"specdec": lambda: specdec.__version__, "transformers": lambda: package_version("transformers"),
               "vllm": vllm_version}[cell.engine]()
    return {"name": cell.engine, "version": version, "settings": settings}
