"""Medusa as a drafter: k heads on the target's last hidden state, head i guessing the token
i + 2 places ahead (Cai et al., 2024), computed as vLLM runs it (`model_executor/models/medusa.py`).

Each head is a stack of residual blocks x + SiLU(W x) followed by its own lm_head over the
target's vocabulary; it reads the target's final normed hidden state (cache.py's id L) at the
position whose logits chose the last emitted token. The heads draft independently of each
other, so a proposal costs no forward of anything but the heads, and a proposal holds at most
k tokens. Under sampling head i's draft is drawn from head i's distribution: the verifier's
rule needs no more (a draft distribution may ignore the earlier drafts).

Given a static token tree (trees.py, the Medusa paper's trees), a node at depth d + 1 with
child rank r takes head d's r-th best token (greedy), or the r-th of its parent's draws
without replacement from head d (sampling: siblings as the model drafter draws them, each
with the distribution it was drawn from); a tree reaches at most k deep. The heads keep no
cache, so nothing is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .drafters import Drafter, DraftSession, StepOutcome, grow_tree, static_draft
from .sampling import Sampler
from .trees import TreeShape


@dataclass(frozen=True)
class MedusaSpec:
    """What a Medusa checkpoint's config says (head_formats.py reads it): `num_heads` heads of
    `num_layers` residual blocks each, over the target's `hidden_size` and `vocab_size`."""

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int
    bias: bool = False  # vLLM's `medusa_fc_bias`


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, layers: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """`blocks.{i}.layers.{l}` and `lm_heads.{i}`, as checkpoints name them."""

    def __init__(self, spec: MedusaSpec):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(_ResidualBlock(spec.hidden_size, spec.num_layers, spec.bias)
                                    for _ in range(spec.num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
                                      for _ in range(spec.num_heads))

    def forward(self, hidden: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The logits (B, T, V) of the first `count` heads from the target's states (B, T, H)."""
        return [lm_head(block(hidden)) for block, lm_head in zip(self.blocks[:count], self.lm_heads[:count])]


def check_tree(tree: TreeShape, num_heads: int) -> None:
    """Refuse a tree deeper than the heads: each depth is one head's."""
    if tree.depth > num_heads:
        raise ValueError(f"{tree.depth} deep, but a Medusa head drafts one depth per head and this one has {num_heads}")


class MedusaDrafter(Drafter):
    """Drafts a chain of min(gamma, num_heads) tokens, or `tree` cut at that depth, with
    `MedusaHeads` on the target's device and dtype; `target_layers`: the target's decoder
    layers (its final normed state is id L)."""

    def __init__(self, heads: MedusaHeads, target_layers: int, tree: TreeShape | None = None):
        if tree is not None and not isinstance(tree, TreeShape):
            raise ValueError(f"Medusa drafts static token trees here (trees.TreeShape), not a {type(tree).__name__}")
        if tree is not None:
            check_tree(tree, heads.spec.num_heads)
        self.heads, self.tree = heads, tree
        self.hidden_ids = (target_layers,)

    @property
    def module(self):
        return self.heads

    def shape(self, gamma: int) -> TreeShape:
        return super().shape(min(gamma, self.heads.spec.num_heads))

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        return _MedusaSession(self, sampler)


class _MedusaSession(DraftSession):
    def __init__(self, drafter: MedusaDrafter, sampler: Sampler):
        self.drafter, self.heads, self.sampler = drafter, drafter.heads, sampler
        self.state: torch.Tensor | None = None  # (B, H) the target's state that chose the last token

    def commit(self, outcome: StepOutcome):
        if self.state is None:  # the prefill: the prompt's last position (left-padded)
            self.state = outcome.hidden[:, -1]
        else:
            rows = torch.arange(outcome.hidden.shape[0], device=outcome.hidden.device)
            self.state = outcome.hidden[rows, outcome.accepted]

    def propose(self, last_tokens, gamma):
        shape = self.drafter.shape(gamma)
        heads = self.heads(self.state[:, None], shape.depth)  # head d scores the children of depth d's nodes
        device = self.state.device
        tokens, probs = grow_tree(shape, self.sampler, self.state.shape[0], device,
                                  lambda depth, level, fed: heads[depth].expand(-1, len(level.nodes), -1))
        return static_draft(shape, tokens, probs, device)

    def select(self, rows):
        if self.state is not None:
            self.state = self.state[torch.tensor(rows, device=self.state.device)]
