"""Token Recycling (Luo et al., 2024): drafts from an adjacency table of the target's own top-k
successors of each token, refreshed from every target step's logits at no extra forward.

The table is (V, top_k) token ids on the verifier's device, -1 where a token was never seen.
Each step, every token the target was fed (the last emitted token, then each draft node up
to the row's draft length) gets the top_k tokens of the logits the target produced after it
(`StepOutcome.logits`: after the node's own root path, for a tree), replacing what the table
held: the most recent context wins (a token fed twice in one step keeps one of its two). At
the first token the fed token is the prompt's last. A proposal expands a static tree
template (`Drafter.shape`: the config's `tree` cut at gamma, or a chain of gamma), as the
paper does: the root is the last emitted token, and a node's child of rank r is the r-th
successor of the node's token in the table; a node whose token was never seen has no
successors, so its children are left out, with their subtrees (a chain ends at its first
token never seen). The template is expanded a depth at a time for the whole batch, on the
device. Drafts are a point mass for the verifier, so the method is lossless.

The table is per cell, as in the paper (kept across requests, so later requests draft from
earlier ones' successors), emptied by `forget()` as the measured window opens (no warm-up
request feeds it, and every repeat starts from the same empty table).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .drafters import Drafter, DraftSession
from .sampling import Draft
from .trees import TreeShape


def check_tree(tree: TreeShape, top_k: int) -> None:
    """Refuse a tree with nodes no table could fill: more children than successors per token."""
    if tree.branching > top_k:
        raise ValueError(f"a node with {tree.branching} children needs as many successors per token; top_k is {top_k}")


class RecyclingDrafter(Drafter):
    partial = True  # a token never seen yet has no successors

    def __init__(self, top_k: int = 8, tree: TreeShape | None = None):
        if top_k < 1:
            raise ValueError(f"RecyclingDrafter top_k must be >= 1, got {top_k}")
        if tree is not None:
            check_tree(tree, top_k)
        self.top_k, self.tree = top_k, tree
        self.table: torch.Tensor | None = None  # (V, top_k) long, -1: never seen

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        if self.table is None or self.table.shape[0] != vocab_size or self.table.device != input_ids.device:
            self.table = torch.full((vocab_size, self.top_k), -1, dtype=torch.long, device=input_ids.device)
        # left-padded: the last column is every prompt's last token
        return _RecyclingSession(self, input_ids[:, -1:])

    def forget(self) -> None:
        self.table = None

    def state(self) -> dict:
        seen = 0 if self.table is None else int((self.table[:, 0] >= 0).sum())
        return {"adjacency_table": "per cell, emptied as the measured window opens", "top_k": self.top_k, "tokens_seen": seen}


@lru_cache(maxsize=64)
def _template(shape: TreeShape, device: torch.device) -> tuple[list[tuple[int, int, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The template a depth at a time, on `device` (made once per shape: a proposal reads it
    every step): (first fed index, end, the nodes' parents as fed indices, their child
    ranks) per depth, nodes being numbered breadth-first; and every node's parent (nodes,)."""
    levels, start = [], 1
    for depth in range(1, shape.depth + 1):
        end = start + sum(len(p) == depth for p in shape.paths)
        nodes = range(start - 1, end - 1)
        levels.append((start, end, torch.tensor([shape.parents[i] for i in nodes], device=device),
                       torch.tensor([shape.paths[i][-1] for i in nodes], device=device)))
        start = end
    return levels, torch.tensor(shape.parents, device=device)


class _RecyclingSession(DraftSession):
    def __init__(self, drafter: RecyclingDrafter, fed: torch.Tensor):
        self.drafter, self.table = drafter, drafter.table
        self.fed = fed  # (B, W) what the target was fed in the step whose outcome comes next
        self.lengths = torch.zeros(fed.shape[0], dtype=torch.long, device=fed.device)  # draft nodes among them

    def commit(self, outcome):
        successors = outcome.logits.topk(self.table.shape[1], dim=-1).indices  # (B, W, k)
        positions = torch.arange(self.fed.shape[1], device=self.fed.device)
        fed = positions <= self.lengths[:, None]  # a row's filler past its draft was never its text
        self.table[self.fed[fed]] = successors[fed]

    def propose(self, last_tokens, gamma):
        shape = self.drafter.shape(gamma)
        batch, device = last_tokens.shape[0], last_tokens.device
        tokens = torch.zeros(batch, shape.nodes + 1, dtype=torch.long, device=device)  # [root, nodes] by fed index
        tokens[:, 0] = last_tokens
        alive = torch.ones_like(tokens, dtype=torch.bool)
        levels, parents = _template(shape, device)
        for start, end, above, ranks in levels:
            successors = self.table[tokens[:, above].clamp(min=0), ranks]
            tokens[:, start:end] = successors
            alive[:, start:end] = alive[:, above] & (successors >= 0)  # a node never seen has no children
        tokens, alive = tokens[:, 1:], alive[:, 1:]
        # The kept nodes to the front, in order (a parent before its children), parents renumbered.
        renumbered = torch.cat([torch.zeros_like(tokens[:, :1]), alive.long().cumsum(1)], dim=1)
        parents = renumbered.gather(1, parents.expand(batch, -1))
        order = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices
        self.lengths = alive.sum(1)
        # No wider than the longest draft: filler positions would widen the target's forward.
        width = int(self.lengths.max())
        tokens = torch.where(alive, tokens, 0).gather(1, order)[:, :width]
        parents = torch.where(alive, parents, 0).gather(1, order)[:, :width]
        self.fed = torch.cat([last_tokens[:, None], tokens], dim=1)
        return Draft(tokens, self.lengths, parents=None if shape.is_chain() else parents, branching=shape.branching)

    def select(self, rows):
        index = torch.tensor(rows, device=self.fed.device)
        self.fed, self.lengths = self.fed[index], self.lengths[index]
