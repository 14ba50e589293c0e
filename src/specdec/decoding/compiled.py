"""Compiled step forwards: a model's static-cache steps run through `torch.compile`, every
shape compiled (and on CUDA captured) before the measured window.

`torch.compile` rather than a hand-held `torch.cuda.CUDAGraph`: one path serves both
devices. On CUDA `mode="reduce-overhead"` captures a CUDA graph per (batch size, width) and
replays it, with inductor's fused kernels inside; on the CPU the same call compiles with
inductor and freezing (weights folded in as constants, prepacked for the CPU's GEMM), where
there is no graph to capture. Capturing by hand would need our own static input buffers, a
capture per shape and a second code path for the CPU; the compiler does all three, and
transformers' `StaticCache` marks its tensors as static addresses for exactly this use.

Compiling costs seconds (a small model) to minutes (the CPU with freezing), so inductor's
caches go to one folder shared by every cell (`compile_cache_dir`): the cost is paid once per
model and shape, later processes load the compiled kernels.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .cache import logits_and_hidden, model_device, open_cache, use_static_cache

# One graph per (user, batch size, width, mask): the target's widths 1 .. gamma + 1, the
# drafter's 1 and 2, a token tree's widths under its mask, for every batch size rows leave
# down to. Beyond dynamo's default of 8 graphs; more where a cell's shapes need it.
RECOMPILE_LIMIT = 256


def compile_cache_dir(folder: Path) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, kernels) at `folder`;
    a process compiles after this call."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def compile_steps(model, max_length: int, batch_size: int, widths: dict[str, list[int]],
                  cache_dir: Path | None = None, hidden_ids: dict[str, tuple[int, ...]] | None = None,
                  tree_widths: dict[str, list[int]] | None = None) -> dict:
    """Set `model` up with static caches of `max_length` slots and compiled step forwards,
    and compile (capture) every shape decoding will run: each user ("target", "drafter") in
    `widths` with its step widths, and in `tree_widths` with those of its steps under a token
    tree's mask, at every batch size 1 .. `batch_size`; a user in `hidden_ids` with the
    hidden states its steps return (a drafting head's inputs).

    Returns the record of what was done (`result.json`'s `engine.settings.compile`)."""
    folder = compile_cache_dir(cache_dir) if cache_dir is not None else None
    shapes = batch_size * sum(map(len, [*widths.values(), *(tree_widths or {}).values()]))
    limit = max(RECOMPILE_LIMIT, 2 * shapes)  # a graph break's resumed frames compile per shape too
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    # the process's total over every frame: the target's and a drafter's graphs together
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 2 * limit)
    cuda = model_device(model).type == "cuda"
    options = {"mode": "reduce-overhead"} if cuda else {"options": {"freezing": True}}
    # CUDA: a graph per shape, as captured graphs need. CPU: automatic dynamic shapes, so the
    # widths and batch sizes after the first few share a graph (each costs a minute or more).
    compiled = torch.compile(model.forward, dynamic=False if cuda else None, fullgraph=False, **options)

    def step(**kwargs):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        # A replayed graph's outputs are overwritten by its next replay: the caller keeps a
        # copy (the hidden states are one already: concatenated outside the graph).
        logits, hidden = logits_and_hidden(compiled(**kwargs), kwargs)
        return logits.clone(), hidden

    use_static_cache(model, max_length, step)
    started = time.perf_counter()
    warm_up(model, batch_size, widths, hidden_ids or {}, tree_widths or {})
    return {"enabled": True, "static_cache": True, "device": "cuda" if cuda else "cpu",
            "mode": options.get("mode", "default, freezing"), "max_length": max_length,
            "compile_s": time.perf_counter() - started, "cache_dir": str(folder) if folder else None}


def warm_up(model, batch_size: int, widths: dict[str, list[int]], hidden_ids: dict[str, tuple[int, ...]],
            tree_widths: dict[str, list[int]] | None = None) -> None:
    """Run each step shape once on the model's static caches (dummy tokens), with the hidden
    states each user asks for, so compiling and capturing happen here, never inside a
    measured request. A tree width's step takes a ready 4D mask (`KVCache.feed`'s ancestry),
    which the model's graph takes as is where a chain's 2D mask is made causal inside it: a
    separate graph, whatever the tree."""
    device = model_device(model)
    tree_widths = tree_widths or {}
    with torch.inference_mode():
        for user in dict.fromkeys([*widths, *tree_widths]):
            shapes = [(width, False) for width in widths.get(user, [])] + [(width, True) for width in tree_widths.get(user, [])]
            for batch in range(batch_size, 0, -1):
                ids = torch.ones(batch, 1, dtype=torch.long, device=device)
                cache, _ = open_cache(model, ids, torch.ones_like(ids), user, hidden_ids=hidden_ids.get(user, ()))
                for width, tree in shapes:
                    tokens = torch.ones(batch, width, dtype=torch.long, device=device)
                    sees = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(batch, -1, -1) if tree else None
                    cache.extend(tokens, torch.ones_like(tokens, dtype=torch.bool), ancestry=sees)
                    cache.rollback(torch.ones(batch, dtype=torch.long, device=device), width, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def step_widths(gamma: int, role: str) -> list[int]:
    """The widths of a role's step forwards: the target scores [last token, drafts] (1 ..
    gamma + 1: fewer drafts near the length limit, or from the n-gram table); a model drafter
    feeds one token, or two when it catches up on its last accepted draft."""
    return list(range(1, gamma + 2)) if role == "target" else [1, 2]
