"""Token distributions and the one acceptance rule every drafter is verified with.

Greedy decoding is the temperature -> 0 limit of the rule: a draft token survives when it is
the target's argmax, and the first mismatch is replaced by the target's argmax.
Sampling follows Leviathan et al. (2023) / Chen et al. (2023): accept a draft token d with
probability min(1, p(d)/q(d)); at the first rejection draw from norm(max(0, p - q)); when
every draft survives draw a bonus token from p. p and q are warped (temperature, top-k,
top-p) the same way, with transformers' own logits warpers, so our sampling matches
`generate()`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass
class Draft:
    """Up to gamma proposed tokens per row, on the verifier's device.

    tokens: (B, g) long; a row's tokens past its length are filler and never accepted.
    lengths: (B,) long, tokens proposed per row.
    probs: (B, g, V) float32, the distribution each token was drawn from; None for a point
    mass (a deterministic drafter, or any drafter under greedy decoding).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    probs: torch.Tensor | None = None

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


def verify(logits: torch.Tensor, draft: Draft, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of each row's draft and choose the token that follows it.

    logits: (B, g + 1, V) target logits; position i scores the token after the i-th input
    (the last emitted token, then the g draft tokens). Returns (accepted (B,), next (B,)):
    row b keeps draft.tokens[b, :accepted[b]] followed by next[b]. With g == 0 this is plain
    autoregressive sampling from the target.
    """
    batch, width, vocab = logits.shape
    g = width - 1
    rows = torch.arange(batch, device=logits.device)
    in_draft = torch.arange(g, device=logits.device) < draft.lengths[:, None]
    if sampler.greedy:
        best = logits.argmax(-1)
        ok = (draft.tokens == best[:, :g]) & in_draft
        accepted = ok.long().cumprod(1).sum(1)
        return accepted, best[rows, accepted]

    p = sampler.probs(logits)
    p_draft = p[:, :g].gather(2, draft.tokens[..., None]).squeeze(-1)
    if draft.probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft.probs.gather(2, draft.tokens[..., None]).squeeze(-1)
    u = torch.rand(p_draft.shape, generator=sampler.generator, device=p.device)
    ok = (u * q_draft < p_draft) & in_draft  # u < p/q without dividing by q
    accepted = ok.long().cumprod(1).sum(1)

    p_next = p[rows, accepted]
    q_next = torch.zeros_like(p_next)  # stays zero for the bonus token (all drafts accepted)
    if g > 0:
        rejected = accepted < draft.lengths
        at = accepted.clamp(max=g - 1)
        if draft.probs is None:
            q_next[rows, draft.tokens[rows, at]] = 1.0
        else:
            q_next = draft.probs[rows, at]
        q_next = q_next * rejected[:, None]
    residual = (p_next - q_next).clamp_(min=0)
    # p == q leaves no residual mass (then any rejection had probability zero): draw from p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return accepted, sampler.sample(residual)
