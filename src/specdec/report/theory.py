"""The theory beside the measurement, from the cells' own steps: the costs behind Leviathan
et al.'s prediction, the waterfall from the ideal speedup to the measured one, and the gamma
the measured alpha and costs predict to be best.

Every cost comes from the `attribution` block a cell's run wrote (its own forwards, at its
batch size, in its measured window). A drafting cell has no one-token target forward, so the
unit, the target's one-token decode forward at that batch size, is its AR cell's (the same
baseline its speedup divides by):

    c = drafter one-token forward / target one-token forward (the AR cell's)
    v = target (K + 1)-token verification forward / target one-token forward

and `leviathan.predicted_speedup(alpha, c, v, draft length shares)` is the prediction of the
decode steady state (`predicted_decode_speedup`). The measured speedup is a throughput's,
prefills included, so `predicted_speedup` adds them (`with_prefills`): a drafter's own
prefill is outside every step yet can cost more than its drafts (bf16 on a CPU without
bf16 units: 2.4 s per HumanEval prompt here, against 0.55 s for the fp32 target's).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from specdec.gate.cells import GAMMA_MAX, Cell
from specdec.job.leviathan import expected_tokens, expected_tokens_per_step, predicted_speedup
from specdec.job.metrics import MetricsError
from specdec.report import columns as col
from specdec.result import Attribution, Result

# The speedup after each step of the waterfall (speedup_waterfall figure), in order.
WATERFALL = {
    "waterfall_ideal": "ideal from α",
    "waterfall_drafter": "− drafter",
    "waterfall_verify": "− verification",
    "waterfall_overhead": "− overhead",
}
RUN_COLUMNS = (col.THEORY_COST_RATIO, "theory_verify_cost_ratio", "predicted_decode_speedup", col.PREDICTED_SPEEDUP, *WATERFALL)
GAMMA_COLUMNS = (
    col.EXPERIMENT, col.DATASET, col.ENGINE, col.DRAFTER, col.BATCH_SIZE, col.LOAD, "alpha", "cost_ratio",
    "verify_cost_per_token", "measured", "best_measured_gamma", "predicted", "best_predicted_gamma",
    "best_predicted_speedup",
)


def mean_forward(attribution: Attribution | None, role: str, width: int) -> float | None:
    """Mean seconds of the `role` forwards (`target_decode`, `drafter`) that took `width`
    new tokens, or None when the run timed none."""
    if attribution is None or not attribution.timed_forwards:
        return None  # not timed, or a vLLM cell (its forwards run in its engine process)
    bucket = attribution.forward(role, width)
    return None if bucket is None else bucket.mean_s


def _step_seconds(attribution: Attribution) -> dict[str, float] | None:
    """Seconds per decode step (prefill left out) spent in each part."""
    steps = attribution.steps or 0
    if not attribution.timed_forwards or not steps:
        return None
    parts = attribution.parts_s
    decode = attribution.decode_s - parts["prefill"]
    # a model-free drafter's proposals are host work: `other`, not a drafter part
    return {"step": decode / steps, "drafter": (parts["drafter"] or 0.0) / steps, "verify": parts["verify"] / steps}


def _paced_s(cell: Cell) -> float:
    """Seconds per draft token of a replay drafter paced on the host (no model, so no timed
    forward); 0 for any other drafter without forwards."""
    spec = cell.drafter
    paced = spec is not None and spec.kind == "replay" and not spec.model
    return (spec.cost_ms_per_token or 0.0) / 1000 if paced else 0.0


def run_theory(result: Result, baseline: Result | None) -> dict[str, Any]:
    """The theory's columns of one drafting run paired with its AR run (`RUN_COLUMNS`);
    missing where either run has no timed forwards to draw on."""
    columns = dict.fromkeys(RUN_COLUMNS, math.nan)
    theory, ours = result.theory, result.attribution
    theirs = baseline.attribution if baseline is not None else None
    unit = mean_forward(theirs, "target_decode", 1)
    if theory is None or unit is None:
        return columns
    alpha, shares = theory.alpha, theory.draft_length_shares
    drafter = mean_forward(ours, "drafter", 1) or _paced_s(result.config)  # an n-gram drafter runs no model
    verify = mean_forward(ours, "target_decode", theory.longest_draft + 1)
    if verify is None:
        return columns
    c, v = drafter / unit, verify / unit
    decode = predicted_speedup(alpha, c, v, shares)
    columns.update(theory_cost_ratio=c, theory_verify_cost_ratio=v, predicted_decode_speedup=decode,
                   predicted_speedup=with_prefills(decode, result, baseline))
    step, ar_step = _step_seconds(ours), _step_seconds(theirs)
    if step is not None and ar_step is not None:
        # The ideal step costs one AR step; then the drafter's time is added, the target's
        # one-token forward becomes the verification, and the AR step's remaining host
        # time becomes this cell's (the accept step and everything else).
        ideal, ar = expected_tokens(alpha, shares), ar_step["step"]
        columns.update(
            waterfall_ideal=ideal,
            waterfall_drafter=ideal * ar / (ar + step["drafter"]),
            waterfall_verify=ideal * ar / (ar - unit + step["verify"] + step["drafter"]),
            waterfall_overhead=ideal * ar / step["step"],
        )
    return columns


def with_prefills(decode_speedup: float, result: Result, baseline: Result) -> float:
    """The decode steady state's speedup as the throughput's, per output token of the run:

        (p + d) / (p + p_d + d / decode_speedup)

    with p the target's prefill (the same prompts on both sides, so this run's), p_d the
    drafter's prefill, and d AR's decode time without its prefill (the AR run's). NaN where a
    run does not say its output tokens."""
    ours, theirs = result.attribution, baseline.attribution
    tokens = result.metrics.output_tokens if result.metrics else None
    ar_tokens = baseline.metrics.output_tokens if baseline.metrics else None
    if not tokens or not ar_tokens:
        return math.nan
    decode = (theirs.decode_s - theirs.parts_s["prefill"]) / ar_tokens
    prefill = ours.parts_s["prefill"] / tokens
    drafter_prefill = ours.forward("drafter_prefill")
    drafter_prefill = (drafter_prefill.total_s if drafter_prefill else 0.0) / tokens
    return (prefill + decode) / (prefill + drafter_prefill + decode / decode_speedup)


def theory_columns(runs: Sequence[Result]) -> list[dict[str, Any]]:
    """`run_theory` of each run against its AR run: the same repeat of the cell's
    `ar_counterpart`, else its first repeat."""
    ar_runs: dict[str, dict[int, Result]] = {}
    for result in runs:
        if result.config.method == "ar" and result.ok:
            ar_runs.setdefault(result.config.group_id, {})[result.config.repeat] = result
    columns = []
    for result in runs:
        cell = result.config
        repeats = ar_runs.get(cell.ar_counterpart().group_id, {})
        baseline = repeats.get(cell.repeat) or next(iter(repeats.values()), None)
        drafting = cell.drafts and result.ok
        columns.append(run_theory(result, baseline) if drafting else dict.fromkeys(RUN_COLUMNS, math.nan))
    return columns


def verify_cost_per_token(points: Iterable[tuple[int, float]]) -> float:
    """The slope b of v(w) = 1 + b (w - 1), a verification of w tokens relative to a
    one-token forward, by least squares through (1, 1) over measured (w, v) points."""
    points = [(w - 1, v - 1) for w, v in points if w > 1]
    if not points:
        raise MetricsError("no verification wider than one token to fit")
    x, y = np.array(points, dtype=float).T
    return float(max((x * y).sum() / (x * x).sum(), 0.0))


def paper_speedup(alpha: float, gamma: int, c: float, slope: float) -> float:
    """Every step drafting gamma tokens: (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + v)),
    v = 1 + slope gamma."""
    return expected_tokens_per_step(alpha, gamma) / (gamma * c + 1 + slope * gamma)


def best_gamma_table(runs: Sequence[Result], summary: pd.DataFrame) -> pd.DataFrame:
    """Per drafter and batch size (and the rest of the setup), the gamma the measured alpha
    and costs predict to be best among 1 .. GAMMA_MAX, beside the best measured one."""
    theory = pd.DataFrame([
        {col.GROUP_ID: result.config.group_id, "alpha": result.theory.alpha, "cell": result.config, "result": result, **row}
        for result, row in zip(runs, theory_columns(runs))
        if result.config.drafts and result.ok and result.theory and not math.isnan(row[col.THEORY_COST_RATIO])
    ])
    if theory.empty:
        return pd.DataFrame(columns=GAMMA_COLUMNS)
    measured = summary.set_index(col.GROUP_ID)[col.SPEEDUP]
    table = []
    setup = lambda cell: (cell.experiment, cell.dataset, cell.target, cell.engine, cell.drafter, cell.batch_size, cell.generation, cell.placement, cell.load)
    for _, rows in theory.groupby(theory["cell"].map(setup), sort=False):
        cell = rows["cell"].iloc[0]
        alpha, c = rows["alpha"].mean(), rows[col.THEORY_COST_RATIO].mean()
        slope = verify_cost_per_token(
            (r.theory.longest_draft + 1, v) for r, v in zip(rows["result"], rows["theory_verify_cost_ratio"])
        )
        predicted = {g: paper_speedup(alpha, g, c, slope) for g in range(1, GAMMA_MAX + 1)}
        speedups = {g: measured.get(gid, math.nan) for g, gid in zip(rows["cell"].map(lambda x: x.gamma), rows[col.GROUP_ID])}
        speedups = dict(sorted((g, s) for g, s in speedups.items() if not math.isnan(s)))
        best = max(predicted, key=predicted.get)
        table.append({
            col.EXPERIMENT: cell.experiment, col.DATASET: cell.dataset, col.ENGINE: cell.engine, col.DRAFTER: cell.drafter.name,
            col.BATCH_SIZE: cell.batch_size, col.LOAD: cell.load.mode, "alpha": alpha, "cost_ratio": c,
            "verify_cost_per_token": slope,
            "measured": "; ".join(f"γ{g}: {s:.2f}" for g, s in speedups.items()),
            "best_measured_gamma": max(speedups, key=speedups.get) if speedups else None,
            "predicted": "; ".join(f"γ{g}: {predicted[g]:.2f}" for g in speedups),
            "best_predicted_gamma": best, "best_predicted_speedup": predicted[best],
        })
    return pd.DataFrame(table, columns=GAMMA_COLUMNS)
