"""The verify cost v(N): one verification step over N draft nodes (the target's forward over
[last token, N nodes] under the tree's mask, `verify` and keeping the accepted path, as the
engine runs it) relative to a one-token step, timed on whatever step path the target is set
up for (growing cache, static cache, compiled steps: `cache.open_cache` chooses).

The tree of N nodes is the first N nodes of the breadth-first binary tree; beside it the same
width as a causal chain, so the tree mask's own cost shows apart from the width's.
"""

from __future__ import annotations

import statistics
import time

import torch

from .cache import KVCache, model_device, open_cache
from .sampling import Draft, Sampler, verify
from .trees import TreeShape

NODES = (1, 2, 4, 8, 16, 32, 64)
WARMUP = 2  # untimed steps first (and a compiled path's compile for the shape)
GREEDY = Sampler(0.0, 0, 1.0, None)


def binary_tree(nodes: int) -> TreeShape:
    """The first `nodes` nodes of the breadth-first binary tree."""
    return TreeShape(TreeShape.from_branching([2] * nodes.bit_length()).paths[:nodes])


def verify_costs(target, input_ids: torch.Tensor, attention_mask: torch.Tensor, nodes=NODES, reps: int = 20) -> dict:
    """Median seconds of `reps` steps (after `WARMUP`) after the cached prompt, which every
    step sees alone: `ar_s` (one token), and per N in `nodes` the tree's step `tree_s`, the
    causal step of the same width `causal_s`, `v` = tree / AR and `tree_over_causal`."""
    vocab = target.config.get_text_config().vocab_size
    batch, device = input_ids.shape[0], model_device(target)

    def median_s(width: int, shape: TreeShape | None = None) -> float:
        cache, _ = open_cache(target, input_ids, attention_mask, "target", room=width)
        prompt, times = cache.used, []
        for rep in range(reps + WARMUP):
            tokens = torch.randint(0, vocab, (batch, width), device=device)  # [last token, nodes]
            draft = None if shape is None else Draft(
                tokens[:, 1:], torch.full((batch,), shape.nodes, device=device),
                parents=torch.tensor([shape.parents], device=device).expand(batch, -1), branching=shape.branching)
            began = time.perf_counter()
            verify_step(cache, tokens, draft)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep >= WARMUP:
                times.append(time.perf_counter() - began)
            cache.rollback(torch.zeros(batch, dtype=torch.long, device=device), cache.used - prompt, 0)  # to the prompt
        return statistics.median(times)

    with torch.inference_mode():
        ar = median_s(1)
        costs = {}
        for n in nodes:
            tree, causal = median_s(n + 1, binary_tree(n)), median_s(n + 1)
            costs[n] = {"tree_s": tree, "causal_s": causal, "v": tree / ar, "tree_over_causal": tree / causal}
    return {"ar_s": ar, "nodes": costs}


def verify_step(cache: KVCache, tokens: torch.Tensor, draft: Draft | None) -> None:
    """The target's step over `tokens` ([last token, nodes]); for a tree, `verify` (greedy)
    and keeping the accepted path's keys and values, as the engine does."""
    logits = cache.extend(tokens, torch.ones_like(tokens, dtype=torch.bool),
                          ancestry=None if draft is None else draft.attention())
    if draft is not None:
        accepted, _, path = verify(logits, draft, GREEDY)
        keep = int(accepted.max()) + 1
        order = torch.cat([torch.zeros_like(accepted)[:, None], path[:, : keep - 1] + 1], dim=1)
        cache.rollback(accepted + 1, tokens.shape[1], keep, order)
