"""The theory beside the measurement, from the cells' own steps: the costs behind Leviathan
et al.'s prediction (chains) and the tree theory's (token trees, `tree_theory`), the waterfall
from the ideal speedup to the measured one, the gamma the measured alpha and costs predict to
be best, and the best tree size.

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

A token tree of N nodes is verified N + 1 wide and yields the tree theory's tau, not the
chain's: its cell is priced with v the mean of its own verification forwards, c the
drafter's forwards per drafting step over the draft's depth (per level, as a chain's per
token), and tau from its per-node counts (`drafting_tau`; docs/methodology.md,
"The tree theory").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from specdec.gate.cells import GAMMA_MAX, Cell
from specdec.job.leviathan import expected_tokens, expected_tokens_per_step, predicted_speedup
from specdec.job.metrics import MetricsError
from specdec.report import columns as col
from specdec.report import tree_theory
from specdec.result import Attribution, Bucket, NodeCount, Result

# The speedup after each step of the waterfall (speedup_waterfall figure), in order.
WATERFALL = {
    "waterfall_ideal": "ideal from α",
    "waterfall_drafter": "− drafter",
    "waterfall_verify": "− verification",
    "waterfall_overhead": "− overhead",
}
RUN_COLUMNS = (col.THEORY_COST_RATIO, col.VERIFY_COST_RATIO, "predicted_decode_speedup", col.PREDICTED_SPEEDUP,
               col.PREDICTED_TAU, *WATERFALL)
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


def drafts_trees(cell: Cell) -> bool:
    """Whether the cell's drafter proposes token trees (static or dynamic), not chains."""
    return cell.drafter is not None and cell.drafter.tree is not None


def _chain_costs(result: Result, unit: float) -> tuple[float, float, float, float] | None:
    """A chain's (tokens per decode step, c, v, decode speedup): Leviathan's model over the
    draft lengths that happened, verified at the longest draft's width."""
    theory, ours = result.theory, result.attribution
    alpha, shares = theory.alpha, theory.draft_length_shares
    drafter = mean_forward(ours, "drafter", 1) or _paced_s(result.config)  # an n-gram drafter runs no model
    verify = mean_forward(ours, "target_decode", theory.longest_draft + 1)
    if verify is None:
        return None
    c, v = drafter / unit, verify / unit
    return expected_tokens(alpha, shares), c, v, predicted_speedup(alpha, c, v, shares)


def drafting_tau(result: Result) -> float:
    """The tokens a drafting step is predicted to yield (`tree_theory`): from the per-node
    counts of a tree drafter (Sequoia's positional acceptance, each node weighted by how
    often it was drafted); for a chain, or a tree result without per-node counts, Leviathan's
    alpha over the depths the drafts reached (the draft lengths that happened)."""
    acceptance, theory = result.acceptance, result.theory
    if acceptance is not None and acceptance.per_node:
        p = tree_theory.positional_acceptance(acceptance.per_node)
        present = tree_theory.presence(acceptance.per_node, acceptance.num_drafts)
        # a rank the verifier never tried has no measured acceptance: its nodes count as never accepted
        paths = [node.path for node in acceptance.per_node if present[node.path] and max(node.path) < len(p)]
        return tree_theory.tree_tau(paths, p, present)
    shares = theory.draft_length_shares
    if shares[0] >= 1:
        return math.nan  # no step drafted
    return (expected_tokens(theory.alpha, shares) - shares[0]) / (1 - shares[0])


def _verifications(attribution: Attribution) -> dict[int, Bucket]:
    """The run's target forwards that verified drafts (wider than one token), by width."""
    return {w: bucket for w, bucket in attribution.widths("target_decode").items() if w > 1 and bucket.count}


def verify_costs(attribution: Attribution, unit: float) -> dict[int, float]:
    """v(w): the cell's verification forwards of each width w > 1, relative to `unit`."""
    return {w: bucket.mean_s / unit for w, bucket in _verifications(attribution).items()}


def _tree_costs(result: Result, unit: float) -> tuple[float, float, float, float] | None:
    """A token tree's (tokens per decode step, c, v, decode speedup): `drafting_tau` over the
    cost of a drafting step, the drafter's forwards (c: per level of the tree, the draft's
    depth) and the verification forwards the cell ran (v: their mean, the widths N + 1 of
    its drafts), against a step without a draft (one target forward)."""
    ours, acceptance, theory = result.attribution, result.acceptance, result.theory
    wide = _verifications(ours).values()
    if not wide or acceptance is None or not acceptance.num_drafts:
        return None
    v = sum(b.total_s for b in wide) / sum(b.count for b in wide) / unit
    drafter = sum(b.total_s for b in ours.widths("drafter").values()) / acceptance.num_drafts / unit
    c = drafter / max(theory.longest_draft, 1)
    undrafted = theory.draft_length_shares[0]
    tokens = undrafted + (1 - undrafted) * drafting_tau(result)
    return tokens, c, v, tokens / (undrafted + (1 - undrafted) * (drafter + v))


def run_theory(result: Result, baseline: Result | None) -> dict[str, Any]:
    """The theory's columns of one drafting run paired with its AR run (`RUN_COLUMNS`);
    missing where either run has no timed forwards to draw on. A tree drafter's cell is
    priced as a tree (`_tree_costs`), a chain's as Leviathan's chain (`_chain_costs`)."""
    columns = dict.fromkeys(RUN_COLUMNS, math.nan)
    theory, ours = result.theory, result.attribution
    theirs = baseline.attribution if baseline is not None else None
    unit = mean_forward(theirs, "target_decode", 1)
    if theory is None or unit is None:
        return columns
    costs = (_tree_costs if drafts_trees(result.config) else _chain_costs)(result, unit)
    if costs is None:
        return columns
    ideal, c, v, decode = costs
    columns.update(theory_cost_ratio=c, theory_verify_cost_ratio=v, predicted_decode_speedup=decode,
                   predicted_speedup=with_prefills(decode, result, baseline), predicted_tau=drafting_tau(result))
    step, ar_step = _step_seconds(ours), _step_seconds(theirs)
    if step is not None and ar_step is not None:
        # The ideal step costs one AR step; then the drafter's time is added, the target's
        # one-token forward becomes the verification, and the AR step's remaining host
        # time becomes this cell's (the accept step and everything else).
        ar = ar_step["step"]
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
    ar_runs = _ar_runs(runs)
    return [run_theory(result, _baseline(result, ar_runs)) if result.config.drafts and result.ok
            else dict.fromkeys(RUN_COLUMNS, math.nan) for result in runs]


def priced_runs(runs: Sequence[Result]) -> list[tuple[Result, dict[str, Any]]]:
    """The drafting runs the theory could price, each with its `run_theory` columns: the
    runs the gamma and tree-size tables weigh."""
    return [(result, row) for result, row in zip(runs, theory_columns(runs))
            if result.config.drafts and result.ok and result.theory and not math.isnan(row[col.THEORY_COST_RATIO])]


def _ar_runs(runs: Sequence[Result]) -> dict[str, dict[int, Result]]:
    """The ok AR runs by group and repeat."""
    ar_runs: dict[str, dict[int, Result]] = {}
    for result in runs:
        if result.config.method == "ar" and result.ok:
            ar_runs.setdefault(result.config.group_id, {})[result.config.repeat] = result
    return ar_runs


def _baseline(result: Result, ar_runs: dict[str, dict[int, Result]]) -> Result | None:
    """A run's AR run: the same repeat of its cell's `ar_counterpart`, else its first repeat."""
    repeats = ar_runs.get(result.config.ar_counterpart().group_id, {})
    return repeats.get(result.config.repeat) or next(iter(repeats.values()), None)


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
        for result, row in priced_runs(runs)
        if not drafts_trees(result.config)  # chains: trees pick their size in `best_tree_table`
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


# The largest tree the theory sizes (nodes verified per step).
TREE_NODES_MAX = 64
TREE_COLUMNS = (
    col.EXPERIMENT, col.DATASET, col.ENGINE, col.DRAFTER, col.BATCH_SIZE, col.LOAD, "acceptance_by_rank", "cost_ratio",
    "verify_cost_per_token", "measured", "predicted", "best_predicted_nodes", "best_tree_per_depth",
    "best_predicted_tau", "best_predicted_speedup",
)
# The speedup_vs_tree_size figure's points: measured per cell, predicted per tree size.
TREE_SIZE_COLUMNS = (col.EXPERIMENT, col.DATASET, col.DRAFTER, "family", "label", "kind", "nodes", col.SPEEDUP,
                     f"{col.SPEEDUP}_ci_low", f"{col.SPEEDUP}_ci_high", "tau")


def _family(cell: Cell) -> tuple:
    """A drafter's setup, whatever its tree and table sizes: the chain and the trees of one
    draft model, head or model-free kind side by side."""
    drafter = cell.drafter
    return (cell.experiment, cell.dataset, cell.target, cell.engine, drafter.kind, drafter.model, drafter.dtype, drafter.source,
            cell.batch_size, cell.generation, cell.placement, cell.load)


def _node_counts(result: Result) -> list[NodeCount]:
    """A run's nodes for the positional acceptance: a tree drafter's per-node counts, a
    chain's positions; none for a tree result written before per-node counts."""
    acceptance = result.acceptance
    if acceptance.per_node:
        return list(acceptance.per_node)
    return [] if drafts_trees(result.config) else tree_theory.chain_nodes(acceptance.per_position)


@dataclass(frozen=True)
class TreeSizes:
    """What the tree theory predicts for one drafter (`best_tree_table`): the positional
    acceptance p, the drafter's cost per level c, the slope b of v, the best tree's nodes in
    the order they were added with their root-path probabilities, and per size N = 1, 2, ..:
    tau(N), the decode steady state's speedup and the throughput's (prefills added)."""

    p: tuple[float, ...]
    cost: float
    slope: float
    tree: list[tuple[tuple[int, ...], float]]
    taus: np.ndarray
    decode: list[float]
    speedups: list[float]

    @property
    def best(self) -> int:
        """The best size N (adding the prefills keeps the order)."""
        return int(np.argmax(self.decode)) + 1

    def at(self, nodes: float) -> str:
        """The predicted speedup at `nodes` rounded, n/a past the largest tree the measured
        ranks and depths span."""
        if math.isnan(nodes):
            return "n/a"
        size = max(1, round(nodes))
        return f"N{size}: " + (f"{self.speedups[size - 1]:.2f}" if size <= len(self.tree) else "n/a")


def _tree_sizes(members: list[tuple[Result, dict]], baseline: Result) -> TreeSizes | None:
    """The tree theory of one drafter's runs (chains and trees) against their AR run: p pooled
    over the runs' node counts, c their mean cost per level, v(N) = 1 + b N fitted to every
    verification they timed, trees at most as deep as their drafts went."""
    p = tree_theory.positional_acceptance([node for result, _ in members for node in _node_counts(result)])
    if not p:
        return None
    unit = mean_forward(baseline.attribution, "target_decode", 1)
    slope = verify_cost_per_token(point for result, _ in members for point in verify_costs(result.attribution, unit).items())
    cost = float(np.mean([row[col.THEORY_COST_RATIO] for _, row in members]))
    tree = tree_theory.best_tree(p, TREE_NODES_MAX, max(result.theory.longest_draft for result, _ in members))
    taus = 1 + np.cumsum([reach for _, reach in tree])
    depths = np.maximum.accumulate([len(path) for path, _ in tree])
    decode = [tau / (cost * depth + 1 + slope * n) for n, (tau, depth) in enumerate(zip(taus, depths), start=1)]
    speedups = [with_prefills(speedup, members[0][0], baseline) for speedup in decode]
    return TreeSizes(p, cost, slope, tree, taus, decode, speedups)


def best_tree_table(runs: Sequence[Result], summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per drafter with token trees (its chain and trees pooled: `_family`) and setup, the best
    tree of each size N = 1 .. TREE_NODES_MAX for the pooled positional acceptance
    (`_tree_sizes`), its predicted speedup

        tau(N) / (c depth(N) + 1 + b N),  prefills added (`with_prefills`, the family's first run),

    and the best N, beside the measured speedup of each cell at its nodes per draft. Returns
    the table and the figure's points (measured cells, then the predicted curve)."""
    families: dict[tuple, list] = {}
    for result, row in priced_runs(runs):
        families.setdefault(_family(result.config), []).append((result, row))
    measured, ar_runs = summary.set_index(col.GROUP_ID), _ar_runs(runs)
    table, points = [], []
    # a drafter measured only as chains asks the gamma table's question (`best_gamma_table`)
    for index, members in enumerate(m for m in families.values() if any(drafts_trees(r.config) for r, _ in m)):
        baseline = _baseline(members[0][0], ar_runs)
        sizes = _tree_sizes(members, baseline) if baseline is not None else None
        if sizes is None:
            continue
        cell = members[0][0].config
        name = next((r.config.drafter.name for r, _ in members if not drafts_trees(r.config)), cell.drafter.name)
        family = {col.EXPERIMENT: cell.experiment, col.DATASET: cell.dataset, col.DRAFTER: name}
        label = f"{name} · {cell.dataset} · batch {cell.batch_size} · {cell.load.mode} · T {cell.generation.temperature:g}"
        groups = dict.fromkeys(r.config.group_id for r, _ in sorted(members, key=lambda m: m[0].acceptance.nodes_verified or 0))
        cells = [measured.loc[g] for g in groups if g in measured.index and not pd.isna(measured.at[g, col.SPEEDUP])]
        points += [{**family, "family": index, "label": label, "kind": at[col.DRAFTER], "nodes": at[col.NODES_PER_DRAFT],
                    **{key: at[key] for key in (col.SPEEDUP, f"{col.SPEEDUP}_ci_low", f"{col.SPEEDUP}_ci_high")},
                    "tau": at[col.MEAN_ACCEPTANCE_LENGTH]} for at in cells]
        points += [{**family, "family": index, "label": label, "kind": "predicted", "nodes": n, col.SPEEDUP: speedup, "tau": tau}
                   for n, (speedup, tau) in enumerate(zip(sizes.speedups, sizes.taus), start=1)]
        best = sizes.best
        table.append({
            **family, col.ENGINE: cell.engine, col.BATCH_SIZE: cell.batch_size, col.LOAD: cell.load.mode,
            "acceptance_by_rank": " ".join(f"p{k} {q:.2f}" for k, q in enumerate(sizes.p)), "cost_ratio": sizes.cost,
            "verify_cost_per_token": sizes.slope,
            "measured": "; ".join(f"{at[col.DRAFTER]} N{at[col.NODES_PER_DRAFT]:.1f}: {at[col.SPEEDUP]:.2f}" for at in cells),
            "predicted": "; ".join(sizes.at(at[col.NODES_PER_DRAFT]) for at in cells),
            "best_predicted_nodes": best,
            "best_tree_per_depth": " ".join(map(str, np.bincount([len(path) for path, _ in sizes.tree[:best]])[1:])),
            "best_predicted_tau": sizes.taus[best - 1], "best_predicted_speedup": sizes.speedups[best - 1],
        })
    table = pd.DataFrame(table, columns=TREE_COLUMNS).sort_values([col.EXPERIMENT, col.DATASET, col.DRAFTER], kind="stable")
    return table, pd.DataFrame(points, columns=TREE_SIZE_COLUMNS)


TREE_CELL_COLUMNS = {  # the summary's column -> its heading in the per-cell table
    col.EXPERIMENT: "experiment", col.DATASET: "dataset", col.ENGINE: "engine", col.DRAFTER: "drafter", col.GAMMA: "γ",
    col.BATCH_SIZE: "batch", col.NODES_PER_DRAFT: "nodes per draft N", col.VERIFY_COST_RATIO: "v(N)",
    col.THEORY_COST_RATIO: "c (per level)", col.MEAN_ACCEPTANCE_LENGTH: "τ measured", col.PREDICTED_TAU: "τ predicted",
    col.SPEEDUP: "speedup", col.PREDICTED_SPEEDUP: "predicted speedup",
}


def tree_cells_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per drafting cell (chains and trees): the nodes a drafting step verified, the cost v of
    that verification, tokens per drafting step measured beside predicted, and the speedup
    measured beside predicted (medians over repeats)."""
    cells = summary[summary[col.GAMMA] > 0].sort_values([col.EXPERIMENT, col.DATASET, col.DRAFTER, col.NODES_PER_DRAFT])
    return cells[list(TREE_CELL_COLUMNS)].rename(columns=TREE_CELL_COLUMNS).reset_index(drop=True)
