"""Token Recycling (Luo et al., 2024): drafts from an adjacency table of the target's own top-k
successors of each token, refreshed from every target step's logits at no extra forward.

The table is (V, top_k) token ids on the verifier's device, -1 where a token was never seen.
Each step, every token the target was fed (the last emitted token, then each draft token up
to the row's draft length) gets the top_k tokens of the logits the target produced after it
(`StepOutcome.logits`), replacing what the table held: the most recent context wins. At the
first token the fed token is the prompt's last. A proposal is a chain: from the last emitted
token, each next token is the previous one's first successor, until gamma tokens or a token
never seen. Drafts are a point mass for the verifier, so the method is lossless.

The table is per cell, as in the paper (kept across requests, so later requests draft from
earlier ones' successors), emptied by `forget()` as the measured window opens (no warm-up
request feeds it, and every repeat starts from the same empty table). Chains only, for now:
the paper drafts a tree by a static template over the top_k successors, which comes with
token trees.
"""

from __future__ import annotations

import torch

from .drafters import Drafter, DraftSession
from .sampling import Draft


class RecyclingDrafter(Drafter):
    def __init__(self, top_k: int = 8):
        if top_k < 1:
            raise ValueError(f"RecyclingDrafter top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.table: torch.Tensor | None = None  # (V, top_k) long, -1: never seen

    def start(self, input_ids, attention_mask, sampler, vocab_size):
        if self.table is None or self.table.shape[0] != vocab_size or self.table.device != input_ids.device:
            self.table = torch.full((vocab_size, self.top_k), -1, dtype=torch.long, device=input_ids.device)
        return _RecyclingSession(self.table, input_ids[:, -1:])  # left-padded: the last column is every prompt's last token

    def forget(self) -> None:
        self.table = None

    def state(self) -> dict:
        seen = 0 if self.table is None else int((self.table[:, 0] >= 0).sum())
        return {"adjacency_table": "per cell, emptied as the measured window opens", "top_k": self.top_k, "tokens_seen": seen}


class _RecyclingSession(DraftSession):
    def __init__(self, table: torch.Tensor, fed: torch.Tensor):
        self.table = table
        self.fed = fed  # (B, W) what the target was fed in the step whose outcome comes next
        self.lengths = torch.zeros(fed.shape[0], dtype=torch.long, device=fed.device)  # draft tokens among them

    def commit(self, outcome):
        successors = outcome.logits.topk(self.table.shape[1], dim=-1).indices  # (B, W, k)
        positions = torch.arange(self.fed.shape[1], device=self.fed.device)
        fed = positions <= self.lengths[:, None]  # a row's filler past its draft was never its text
        self.table[self.fed[fed]] = successors[fed]

    def propose(self, last_tokens, gamma):
        tokens, known, token = [], [], last_tokens
        alive = torch.ones_like(last_tokens, dtype=torch.bool)
        for _ in range(gamma):
            token = self.table[token.clamp(min=0), 0]
            alive = alive & (token >= 0)  # a chain ends at its first token never seen
            tokens.append(torch.where(alive, token, 0))
            known.append(alive)
        self.lengths = torch.stack(known, dim=1).sum(1)
        # No wider than the longest chain: filler positions would widen the target's forward.
        drafts = torch.stack(tokens, dim=1)[:, : int(self.lengths.max())]
        self.fed = torch.cat([last_tokens[:, None], drafts], dim=1)
        return Draft(drafts, self.lengths)

    def select(self, rows):
        index = torch.tensor(rows, device=self.fed.device)
        self.fed, self.lengths = self.fed[index], self.lengths[index]
