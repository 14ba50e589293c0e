"""Acceptance of drafted tokens: the result's `acceptance` block from request records,
under our names and under vLLM's.

| Metric | Definition |
|---|---|
| Acceptance rate | `accepted_tokens / drafted_tokens` over measured requests. |
| Mean accepted length | `output_tokens / target_forwards`: tokens emitted per target forward, prefill forward included (AR: 1; speculative: up to gamma + 1). |
| Per-position rate | `accepted / drafted` at draft position i (1-based); position i counts as accepted only when positions 1..i all were. |
| Nodes per draft | `drafted_tokens / num_drafts`: the nodes a drafting step verified (a chain's tokens); the verification forward is one wider. |
| Per-node counts | a tree drafter's: per node (its path of child ranks), drafted, tried (its parent accepted and no earlier sibling) and accepted. |

An engine whose rows carry no drafts (a server, `engines.openai`) gets the same block from
its own counters over the window (`from_counters`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from specdec.decoding.trees import key_path
from specdec.job.metrics import MetricsError, measured, record_field


def _rate(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _per_position(rows: list[dict], gamma: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Drafted and accepted counts per draft position, summed over rows; None for engines
    without per-position counts (transformers' assisted generate)."""
    drafted = np.zeros(gamma, dtype=int)
    accepted = np.zeros(gamma, dtype=int)
    for row in rows:
        for key, total in (("drafted_per_position", drafted), ("accepted_per_position", accepted)):
            counts = row.get(key)
            if counts is None:
                return None
            if len(counts) != gamma:
                raise MetricsError(
                    f"request {row.get('request_id', '?')!r}: {key} has {len(counts)} "
                    f"entries, expected gamma = {gamma}"
                )
            total += counts
    return drafted, accepted


def _per_node(rows: list[dict]) -> list[dict] | None:
    """Drafted, tried and accepted counts per tree node, summed over rows, in a static tree's
    path order (by depth, then ranks); None unless every row has them (a tree drafter's)."""
    if not rows or any("per_node" not in row for row in rows):
        return None
    totals: dict[tuple[int, ...], np.ndarray] = {}
    for row in rows:
        for key, counts in row["per_node"].items():
            totals[key_path(key)] = totals.get(key_path(key), 0) + np.array(counts)
    return [{"path": list(path), **dict(zip(("drafted", "tried", "accepted"), map(int, totals[path])))}
            for path in sorted(totals, key=lambda p: (len(p), p))]


def acceptance_block(drafted: int, accepted: int, forwards: int, output_tokens: int,
                     per_position: tuple[Sequence[int], Sequence[int]] | None,
                     per_node: list[dict] | None = None) -> dict:
    """The `acceptance` block from its counts, under our names and under vLLM's.

    Ours: acceptance rate = accepted / drafted; mean accepted length = output tokens per
    target forward (the prefill counts). vLLM's (its spec-decode metrics): a *draft* is a
    step that proposed at least one token; mean acceptance length = 1 + accepted / drafts
    (the bonus token included); per-position acceptance = accepted at position i / drafts;
    `accepted_per_step[k]` = drafts that kept exactly k tokens. Acceptance stops at the first
    rejection, so the drafts keeping at least k tokens are those accepted at position k."""
    block = {
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "target_forwards": forwards,
        "acceptance_rate": _rate(accepted, drafted),
        "mean_accepted_length": _rate(output_tokens, forwards),
        "per_position": [],
        "num_drafts": None,
        "mean_acceptance_length": None,
        "accepted_per_step": [],
    }
    if per_position is None:
        return block
    by_position, kept = (list(map(int, counts)) for counts in per_position)
    drafts = by_position[0] if by_position else 0
    at_least = [drafts, *kept, 0]
    block |= {
        "per_position": [
            {"position": i + 1, "drafted": d, "accepted": a, "rate": _rate(a, d), "rate_per_draft": _rate(a, drafts)}
            for i, (d, a) in enumerate(zip(by_position, kept))
        ],
        "num_drafts": drafts,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "accepted_per_step": [a - b for a, b in zip(at_least, at_least[1:])],
    }
    if drafts:
        block["nodes_per_draft"] = drafted / drafts
    if per_node is not None:
        block["per_node"] = per_node
    return block


def from_counters(counters: dict, records: Sequence[dict], gamma: int) -> dict:
    """The `acceptance` block from an engine's own counters over the window (vLLM's
    `vllm:spec_decode_*`, which a server exposes), where the rows carry no drafts; target
    forwards are the rows' (one per streamed engine step). The counters give accepted tokens
    per position and the drafts; drafted tokens per position follow only when every draft
    proposed gamma tokens, else the per-position entries stay empty."""
    rows = measured(records)
    drafts, drafted, accepted = counters["num_drafts"], counters["num_draft_tokens"], counters["num_accepted_tokens"]
    full = drafted == drafts * gamma
    block = acceptance_block(
        drafted=drafted, accepted=accepted,
        forwards=sum(record_field(r, "target_forwards") for r in rows),
        output_tokens=sum(record_field(r, "output_tokens") for r in rows),
        per_position=([drafts] * gamma, (counters["num_accepted_tokens_per_pos"] + [0] * gamma)[:gamma]) if full else None,
    )
    return block | {"num_drafts": drafts, "mean_acceptance_length": 1 + accepted / drafts if drafts else None}


def acceptance(records: Sequence[dict], gamma: int | None) -> dict | None:
    """The `acceptance` block of measured records; None for methods that draft nothing."""
    if not gamma:
        return None
    rows = measured(records)
    return acceptance_block(
        drafted=sum(record_field(r, "drafted_tokens") for r in rows),
        accepted=sum(record_field(r, "accepted_tokens") for r in rows),
        forwards=sum(record_field(r, "target_forwards") for r in rows),
        output_tokens=sum(record_field(r, "output_tokens") for r in rows),
        per_position=_per_position(rows, gamma),
        per_node=_per_node(rows),
    )
