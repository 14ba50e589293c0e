"""Token distributions and the one acceptance rule every drafter is verified with, for a
chain of draft tokens or a tree of them (trees.py; a chain is the tree of width 1).

Greedy decoding is the temperature -> 0 limit of the rule: a draft node survives when it is
the target's argmax after its parent, and the deepest surviving root path is kept, followed
by the target's argmax after it.
Sampling follows Leviathan et al. (2023) / Chen et al. (2023) on a chain, and SpecInfer's
multi-candidate rule (Miao et al., 2024), recursive rejection over siblings, on a tree: at a
reached node its children are tried in order; child x drawn from q is accepted with
probability min(1, r(x)/q(x)), where r is the target's distribution p at the node after the
earlier siblings' rejections (r <- norm(max(0, r - q)) per rejected sibling, q the
distribution that sibling was drawn from); when every child is rejected the next token is
drawn from the last r (from p at a node without children: the bonus token). Each child's q
is the distribution it was drawn from given its earlier siblings, so siblings drawn with
replacement (the same q) and without it (q with the earlier siblings removed) are both
exact (docs/methodology.md, "Token trees"). p and q are warped (temperature, top-k, top-p)
the same way, with transformers' own logits warpers, so our sampling matches `generate()`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .trees import ancestry, chain_parents, first_among_siblings, sibling_rank


@dataclass
class Draft:
    """Up to g proposed nodes per row, on the verifier's device: a chain, or a tree (trees.py).

    tokens: (B, g) long; a row's nodes past its length are filler and never accepted.
    lengths: (B,) long, nodes proposed per row.
    probs: (B, g, V) float32, the distribution each node was drawn from (given its earlier
    siblings); None for a point mass (a deterministic drafter, or any drafter under greedy).
    parents: (B, g) long, each node's parent as a fed index (0: the last emitted token; a
    filler node's is 0); None: a chain. branching: the most children of one node (host).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    probs: torch.Tensor | None = None
    parents: torch.Tensor | None = None
    branching: int = 1

    @cached_property
    def tree_parents(self) -> torch.Tensor:
        if self.parents is not None:
            return self.parents
        return chain_parents(*self.tokens.shape, self.tokens.device)

    @cached_property
    def ancestry(self) -> torch.Tensor:
        """(B, g + 1, g + 1) which fed tokens each one sees (trees.ancestry; a chain's: causal)."""
        if self.parents is None:
            fed = self.tokens.shape[1] + 1
            return torch.ones(fed, fed, dtype=torch.bool, device=self.tokens.device).tril_().expand(len(self.tokens), -1, -1)
        return ancestry(self.parents)

    @cached_property
    def in_draft(self) -> torch.Tensor:
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) < self.lengths[:, None]

    @cached_property
    def depths(self) -> torch.Tensor:
        """(B,) the depth of each row's draft (its length, for a chain)."""
        if self.parents is None:
            return self.lengths
        depth = torch.where(self.in_draft, self.ancestry[:, 1:].sum(-1) - 1, 0)
        return torch.cat([torch.zeros_like(self.lengths)[:, None], depth], 1).amax(1)

    def attention(self) -> torch.Tensor | None:
        """What the target's step over [last token, nodes] attends to among those tokens, as
        `cache.KVCache.extend` takes it: None for a chain (causal)."""
        return None if self.parents is None else self.ancestry

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> Draft:
        return cls(
            torch.zeros(batch, 0, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )


class Sampler:
    """Turns logits into tokens the way the settings ask (greedy or warped sampling)."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
        self.greedy = temperature == 0
        self.generator = generator
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))

    def on(self, device: torch.device) -> Sampler:
        """The same sampler drawing on `device` (a drafter may live elsewhere); its generator
        is seeded from ours, so a seeded run stays reproducible."""
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        if self.generator is None or gen_device == torch.device(device):
            return self
        twin = Sampler.__new__(Sampler)
        twin.greedy, twin.warpers = self.greedy, self.warpers
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=gen_device))
        twin.generator = torch.Generator(device=device).manual_seed(seed)
        return twin

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped float32 probabilities over the last dimension of `logits` (any leading shape)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        flat = self.warpers(None, flat)
        return torch.softmax(flat, dim=-1).reshape(logits.shape)

    def sample(self, weights: torch.Tensor) -> torch.Tensor:
        """One token per row of (B, V) non-negative weights (need not be normalised).

        Inverse CDF with one uniform per row: the first token whose cumulative weight exceeds
        u * total (a zero-weight token never does). torch.multinomial draws an exponential
        per vocabulary entry instead, about 1 ms per row for 49k entries on a CPU core."""
        cdf = weights.cumsum(-1)
        u = torch.rand(cdf.shape[:-1] + (1,), generator=self.generator, device=cdf.device, dtype=cdf.dtype)
        return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp_(max=weights.shape[-1] - 1)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens (B,), probs (B, V) or None under greedy) from (B, V) logits."""
        if self.greedy:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return self.sample(probs), probs

    def children(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k distinct children per row of (..., V) logits: (tokens (..., k), probs (..., k, V)
        or None under greedy). Greedy: the best k. Sampling: k draws without replacement,
        each with the distribution it was drawn from (the earlier draws removed), which is
        what `verify` takes as its q (a single child is `pick`'s draw)."""
        if self.greedy:
            return logits.topk(k, dim=-1).indices, None
        q = self.probs(logits)
        tokens, probs = [], []
        for _ in range(k):
            token = self.sample(q)
            tokens.append(token)
            probs.append(q)
            q = q.scatter(-1, token[..., None], 0.0)
            q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
        return torch.stack(tokens, -1), torch.stack(probs, -2)


def verify(logits: torch.Tensor, draft: Draft, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept a root path of each row's draft and choose the token that follows it.

    logits: (B, g + 1, V) target logits; position i scores the token after fed token i (the
    last emitted token, then the g draft nodes). Returns (accepted (B,), next (B,), path
    (B, g)): row b keeps the nodes path[b, :accepted[b]] (indices into draft.tokens, root
    to leaf; the rest 0) followed by next[b]. With g == 0 this is plain autoregressive
    sampling from the target.
    """
    batch, width, vocab = logits.shape
    rows = torch.arange(batch, device=logits.device)
    parents = draft.tree_parents
    if sampler.greedy:
        best = logits.argmax(-1)
        passed = (draft.tokens == best.gather(1, parents)) & draft.in_draft
        accepted, end, path = _accepted_path(draft, passed)
        return accepted, best[rows, end], path

    p = sampler.probs(logits)
    q_token = (torch.ones_like(draft.tokens, dtype=p.dtype) if draft.probs is None
               else draft.probs.gather(2, draft.tokens[..., None]).squeeze(-1))
    u = torch.rand(draft.tokens.shape, generator=sampler.generator, device=p.device)
    # residual[:, i]: the target's distribution at fed token i after the rejections of the
    # children of i tried so far (rank by rank: every node's k-th child is tried at once).
    residual, passed = p, torch.zeros_like(draft.in_draft)
    rank = sibling_rank(parents, draft.in_draft) if draft.branching > 1 else torch.zeros_like(parents)
    at_parent = parents[..., None].expand(-1, -1, vocab)
    for k in range(draft.branching):
        r = residual.gather(1, at_parent)  # (B, g, V) at each node's parent
        tried = (rank == k) & draft.in_draft
        passed |= tried & (u * q_token < r.gather(2, draft.tokens[..., None]).squeeze(-1))  # u < r/q, no division
        if draft.probs is None:
            left = r.scatter(2, draft.tokens[..., None], 0.0)  # max(0, r - point mass)
        else:
            left = (r - draft.probs).clamp_(min=0)
        total = left.sum(-1, keepdim=True)
        # r == q leaves no residual (the rejection had probability zero): keep r.
        left = torch.where(total > 0, left / total.clamp(min=1e-30), r)
        residual = residual.scatter_add(1, at_parent, torch.where(tried[..., None], left - r, 0.0))
    accepted, end, path = _accepted_path(draft, passed)
    return accepted, sampler.sample(residual[rows, end]), path


def _accepted_path(draft: Draft, passed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the nodes that passed their test: the walk from the root takes each reached
    node's first passing child. Returns (accepted depth (B,), the path's last fed index (B,),
    the path's nodes (B, g) root to leaf, then 0)."""
    batch, g = passed.shape
    index = torch.arange(g, device=passed.device)
    if draft.parents is None:  # a chain: the same rule in closed form, its path its first nodes
        accepted = passed.long().cumprod(1).sum(1)
        return accepted, accepted, index.expand(batch, g)
    chosen = first_among_siblings(draft.parents, passed) if draft.branching > 1 else passed
    nodes = draft.ancestry[:, 1:, 1:]
    kept = ~(nodes & ~chosen[:, None, :]).any(-1)  # every node from the root to it was chosen
    depth = nodes.sum(-1)
    reach = torch.cat([torch.zeros(batch, 1, dtype=depth.dtype, device=depth.device), torch.where(kept, depth, 0)], 1)
    accepted, end = reach.max(1)  # the first maximum: the root when nothing was kept
    on_path = draft.ancestry[torch.arange(batch, device=passed.device), end, 1:]
    path = torch.where(on_path, index, g).sort(1).values  # topological order: root to leaf
    return accepted, end, path.masked_fill_(path == g, 0)
