"""What a measured cell's records say: metrics, acceptance and the theory's alpha and draft
lengths, and the greedy correctness check against the AR cell. `session` is the opened
engine that ran the cell (`engines.Engine`)."""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.engines import placement
from specdec.job import acceptance, leviathan, metrics
from specdec.job.measure import INTERLEAVED_WINDOW
from specdec.records import INTERLEAVED_REQUESTS, read_requests

# Greedy decoding takes the arg-max logit, so two runs that round differently (another batch
# shape, verification width, kernel or engine) may pick different tokens where the target's
# top two logits are closer than that rounding. Below these margins (in logits) a divergence
# is a near-tie, above them a defect; docs/methodology.md, "Lossless and parity checks",
# gives the reasoning.
NEAR_TIE_MARGIN = {
    ("float32", "cpu"): 1e-3,
    ("float32", "cuda"): 1e-2,  # split-K and per-shape kernel choice change reduction orders
    ("float16", "cpu"): 0.25,
    ("float16", "cuda"): 0.25,
    ("bfloat16", "cpu"): 2.0,
    ("bfloat16", "cuda"): 2.0,
}


def near_tie_margin(cell) -> float:
    """The margin under which a greedy divergence of this cell's target is a near-tie: it
    depends on the dtype the target computes in and on the device (`cpu` placement or a GPU)."""
    device = "cpu" if cell.placement.strategy == "cpu" else "cuda"
    return NEAR_TIE_MARGIN[(cell.target.dtype, device)]


def verdict(margin: float, threshold: float) -> str:
    return "near-tie" if margin < threshold else "defect"


def compare_with_reference(session, records: list[dict], reference: list[dict], source: str) -> dict:
    """Greedy outputs must equal the AR cell's token for token. A divergence is reported with
    its position, the target's top-2 logit margin there and a verdict: a near-tie is
    floating point, a defect a bug (`status: failed`). The margin is taken on the prefix both
    outputs share, which is the reference's up to the first divergent position. `reference`
    is the AR records (from `source`: the AR cell's requests.jsonl, or this job's interleaved AR)."""
    ours = {r["request_id"]: r for r in records if not r["warmup"]}
    theirs = {r["request_id"]: r for r in reference if not r["warmup"]}
    shared = sorted(set(ours) & set(theirs))
    threshold = near_tie_margin(session.cell)
    divergences = []
    for request_id in shared:
        a, b = ours[request_id]["output_ids"], theirs[request_id]["output_ids"]
        if a == b:
            continue
        position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = _top2_gap(session, session.prompt_ids[request_id] + b[:position])
        divergences.append({
            "request_id": request_id, "position": position,
            "ours": a[position:position + 1], "reference": b[position:position + 1],
            "target_top2_gap": gap, "verdict": verdict(gap, threshold),
        })
    defects = sum(d["verdict"] == "defect" for d in divergences)
    return {"checked": True, "reference": source, "identical": not divergences and len(shared) == len(ours),
            "requests_compared": len(shared), "divergences": divergences, "near_tie_threshold": threshold,
            "near_ties": len(divergences) - defects, "defects": defects, "status": "failed" if defects else "passed"}


def _top2_gap(session, ids: list[int]) -> float:
    """The target's top-2 logit margin after `ids`, from one uncached forward where the
    target's inputs go (a vLLM cell's target is a transformers copy on the CPU)."""
    with torch.inference_mode():
        logits = session.target(torch.tensor([ids], device=placement.input_device(session.target))).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def _greedy_check(session, records: list[dict], reference: Path | None, missing: str,
                  interleaved: list[dict] | None = None) -> dict:
    if not session.cell.greedy:
        return {"checked": False, "reason": "sampling: losslessness is a property of the output distribution, tested statistically"}
    if interleaved is not None:
        return compare_with_reference(session, records, interleaved, f"{INTERLEAVED_REQUESTS} (interleaved AR)")
    if reference is None:
        return {"checked": False, "reason": missing}
    return compare_with_reference(session, records, read_requests(reference), str(reference))


def _correctness(session, records: list[dict], reference: Path | None, interleaved: list[dict] | None) -> dict:
    """Lossless: a greedy drafting cell against the same engine's AR: the AR cell's, or the
    one interleaved in this job."""
    if not session.cell.drafts:
        return {"checked": False, "reason": "AR is the reference"}
    return _greedy_check(session, records, reference, "no greedy AR cell of this engine with the same settings in the matrix",
                         interleaved)


def _parity(session, records: list[dict], reference: Path | None) -> dict:
    """Engine parity: a cell another engine runs against our engine's AR cell."""
    if session.parity_reference:
        return {"checked": False, "reason": "our engine is the reference"}
    return _greedy_check(session, records, reference, "no greedy AR cell of our engine with the same settings in the matrix")


def interleaved_block(records: list[dict], reference: list[dict]) -> dict:
    """The result's `reference` block of an interleaved cell: its AR requests' metrics over
    their own service time, as the cell's are, and how the two sides alternated."""
    ours = {r["request_id"]: r for r in metrics.measured(records)}
    theirs = {r["request_id"]: r for r in metrics.measured(reference)}
    paired = sorted(set(ours) & set(theirs))
    return {"kind": "interleaved", "requests": INTERLEAVED_REQUESTS, "metrics": metrics.summarize(reference, window="service"),
            "requests_paired": len(paired),
            "reference_first": sum(theirs[r]["start_s"] < ours[r]["start_s"] for r in paired),
            "window": INTERLEAVED_WINDOW}


def analyse(session, records: list[dict], reference: Path | None, parity_reference: Path | None = None,
            interleaved: list[dict] | None = None) -> dict:
    """The result's metrics, acceptance, theory and correctness blocks, and with the records
    of an `interleaved` AR reference its `reference` block. The theory's costs pair the
    cell's attribution with its AR cell's (`specdec.report.theory`); an engine whose counts of
    target forwards are its scheduler's (vLLM) has no theory, and its own counters beside."""
    cell = session.cell
    summary = {"metrics": metrics.summarize(records, window="service" if interleaved is not None else "span"),
               "acceptance": None, "theory": None,
               "correctness": _correctness(session, records, reference, interleaved),
               "parity": _parity(session, records, parity_reference)}
    if interleaved is not None:
        summary["reference"] = interleaved_block(records, interleaved)
    if not cell.drafts:
        return summary
    counters = session.counters()
    # Drafts per request where the rows carry them (a server's only where its chunks do),
    # else the engine's own counters; with neither, acceptance is n/a and the engine says why.
    if session.drafts_per_request or all("drafted_tokens" in r for r in metrics.measured(records)):
        counts = acceptance.acceptance(records, cell.gamma)
    elif counters is not None:
        counts = acceptance.from_counters(counters, records, cell.gamma)
    else:
        return summary
    summary["acceptance"] = counts
    if counters is not None:
        counts["engine_counters"] = counters
    if not session.theory_applies:
        return summary
    alpha = leviathan.per_token_alpha(counts["per_position"])
    if alpha is None:
        return summary
    # A decode step is a target forward that could verify drafts: our engine's prefill
    # cannot (TTFT is the target's alone), transformers' verifies its first draft.
    undrafted = 0 if session.prefill_verifies else len(metrics.measured(records))
    shares = leviathan.draft_length_shares(counts["per_position"], counts["target_forwards"] - undrafted)
    summary["theory"] = leviathan.theory(alpha=alpha, gamma=cell.gamma, shares=shares)
    return summary

