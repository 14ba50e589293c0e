"""Leviathan et al.'s (2023) model of speculative decoding: the per-token acceptance alpha
estimated from per-position counts, the shares of draft lengths, the expected tokens per step,
the predicted speedup, and the result's `theory` block. `specdec.report.theory` pairs these with a
cell's measured costs."""

from __future__ import annotations

from typing import Sequence

from specdec.job.metrics import MetricsError


def per_token_alpha(per_position: Sequence[dict]) -> float | None:
    """Estimate Leviathan's alpha (the i.i.d. per-token acceptance probability).

    `accepted / drafted` is biased low as an alpha: after the first rejection the later
    drafts have no chance. Position i is tried only when positions 1..i-1 were accepted,
    so the maximum-likelihood alpha of a truncated geometric is
    sum(accepted_i) / sum(trials_i) with trials_1 = drafted_1, trials_i = accepted_(i-1).
    Exact when every step drafts gamma tokens (model drafters); when draft lengths vary
    (n-gram), trials_i = min(accepted_(i-1), drafted_i), which counts a step whose shorter
    draft was wholly accepted as a trial of the next position only when the counts force it.
    """
    if not per_position:
        return None
    accepted = [p["accepted"] for p in per_position]
    trials = [per_position[0]["drafted"], *(min(a, p["drafted"]) for a, p in zip(accepted, per_position[1:]))]
    total = sum(trials)
    return sum(accepted) / total if total else None


def _check_theory_inputs(alpha: float, gamma: int) -> None:
    if not 0 <= alpha <= 1:
        raise MetricsError(f"alpha must be in [0, 1], got {alpha}")
    if int(gamma) != gamma or gamma < 1:
        raise MetricsError(f"gamma must be a positive integer, got {gamma}")


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[tokens per verify step] = (1 - alpha^(gamma+1)) / (1 - alpha) = sum of alpha^i, i=0..gamma.

    The sum form is exact at alpha = 1 (gamma + 1) and free of cancellation near it.
    """
    _check_theory_inputs(alpha, gamma)
    return float(sum(alpha**i for i in range(int(gamma) + 1)))


def draft_length_shares(per_position: Sequence[dict], steps: int) -> list[float]:
    """Share of decode steps that drafted 0, 1, .., k tokens, k the longest draft any step
    proposed, from the per-position counts (position i is drafted in every step that drafts
    at least i tokens)."""
    drafted = [p["drafted"] for p in per_position]
    while drafted and not drafted[-1]:
        drafted.pop()
    at_least = [steps, *drafted, 0]
    if steps <= 0 or any(a < b for a, b in zip(at_least, at_least[1:])):
        raise MetricsError(f"per-position drafted counts {drafted} do not fit {steps} decode steps")
    return [(a - b) / steps for a, b in zip(at_least, at_least[1:])]


def expected_tokens(alpha: float, shares: Sequence[float]) -> float:
    """Tokens a decode step yields on average, a step drafting k tokens yielding
    (1 - alpha^(k+1)) / (1 - alpha), weighted by the shares of steps drafting k = 0 .. K."""
    _check_theory_inputs(alpha, max(len(shares) - 1, 1))
    return sum(share * expected_tokens_per_step(alpha, k) if k else share for k, share in enumerate(shares))


def predicted_speedup(alpha: float, c: float, verify_cost: float, shares: Sequence[float]) -> float:
    """Leviathan et al.'s prediction (2023, Thm 3.8) over the draft lengths that happened.

    A step drafting k tokens yields (1 - alpha^(k+1)) / (1 - alpha) tokens on average and
    costs k c + 1 + (verify_cost - 1) k / K target forwards, K = len(shares) - 1 the longest
    draft proposed and verify_cost the measured cost of a (K+1)-token verification forward
    (linear in between). Expected tokens over expected cost, each weighted by the measured
    shares of steps drafting k = 0 .. K tokens. With every step drafting K tokens it is the
    paper's (1 - alpha^(K+1)) / ((1 - alpha) (K c + verify_cost))."""
    longest = len(shares) - 1
    if c < 0 or verify_cost <= 0:
        raise MetricsError(f"costs must be c >= 0 and verify_cost > 0, got {c} and {verify_cost}")
    cost = sum(share * (k * c + 1 + ((verify_cost - 1) * k / longest if longest else 0)) for k, share in enumerate(shares))
    return expected_tokens(alpha, shares) / cost


def theory(alpha: float, gamma: int, shares: Sequence[float]) -> dict:
    """The `theory` block of a result: what the cell alone says of the prediction, its
    alpha and the draft lengths that happened (`shares`, see draft_length_shares); `gamma`
    is the nominal one. The costs pair the cell with its AR cell (`specdec.report.theory`)."""
    _check_theory_inputs(alpha, gamma)
    return {"alpha": alpha, "gamma": gamma, "longest_draft": len(shares) - 1, "draft_length_shares": list(shares)}
