"""The theory's costs from the cells' own timed forwards, against hand-computed values."""

import dataclasses
import itertools
import math
from pathlib import Path

import pandas as pd
import pytest

from specdec.gate.cells import Cell, DrafterSpec, Generation, Load, ModelSpec, Placement
from specdec.decoding.trees import TreeShape
from specdec.job.acceptance import acceptance_block
from specdec.job.leviathan import expected_tokens, expected_tokens_per_step, per_token_alpha
from specdec.records import read_result
from specdec.report.theory import (TREE_NODES_MAX, best_gamma_table, best_tree_table, paper_speedup, run_theory, theory_columns,
                                   verify_cost_per_token)
from specdec.report.tree_theory import best_tree, chain_nodes, positional_acceptance, presence, tree_tau
from specdec.result import Acceptance, Attribution, NodeCount, PositionCount, Result, Theory

INT8 = DrafterSpec(name="int8", kind="quantized", dtype="int8")


def attribution(parts: dict, steps: int, target: dict, drafter: dict | None = None) -> dict:
    """A block as a run writes it: seconds per part, forwards by width (count, total s)."""
    forwards = {"target_decode": {w: {"count": n, "total_s": s, "rows": n} for w, (n, s) in target.items()}}
    if drafter:
        forwards["drafter"] = {w: {"count": n, "total_s": s, "rows": n} for w, (n, s) in drafter.items()}
    return {"available": True, "clock": "host clock", "decode_s": sum(v for v in parts.values() if v is not None), "steps": steps,
            "parts_s": parts, "forwards": forwards}


FIXTURE = read_result(Path(__file__).parent / "fixtures/results/runs/demo/humaneval--specdec-ar--b1-n16-t0-cpu--r0/result.json")


def result(attribution: dict, theory: dict | None = None, output_tokens: int | None = None,
           drafter: DrafterSpec | None = None) -> Result:
    """An ok result with the blocks the theory reads (no metrics: no output tokens)."""
    return dataclasses.replace(
        FIXTURE, attribution=Attribution(attribution), theory=None if theory is None else Theory.from_dict(theory),
        metrics=None if output_tokens is None else dataclasses.replace(FIXTURE.metrics, output_tokens=output_tokens),
        config=FIXTURE.config if drafter is None else dataclasses.replace(FIXTURE.config, drafter=drafter))


# AR: 300 one-token forwards of 36 ms; with 1 s prefill and 1.2 s of host time a step is 40 ms.
AR_ATTRIBUTION = attribution({"prefill": 1.0, "drafter": 0.0, "verify": 10.8, "accept": 0.3, "other": 0.9}, 300, {"1": (300, 10.8)})
AR = result(AR_ATTRIBUTION)
# gamma 4, 20 steps: drafter forwards of 10.8 ms (c = 0.3), verifications of 46.8 ms (v = 1.3)
SPEC_THEORY = {"alpha": 0.5, "gamma": 4, "longest_draft": 4, "draft_length_shares": [0, 0, 0, 0, 1]}
SPEC_ATTRIBUTION = attribution({"prefill": 0.2, "drafter": 0.864, "verify": 0.936, "accept": 0.05, "other": 0.15}, 20,
                               {"5": (20, 0.936)}, {"1": (80, 0.864)})
SPEC = result(SPEC_ATTRIBUTION, SPEC_THEORY)


def test_costs_come_from_the_cells_own_forwards_in_units_of_the_ar_forward():
    row = run_theory(SPEC, AR)
    assert row["theory_cost_ratio"] == pytest.approx(0.3) and row["theory_verify_cost_ratio"] == pytest.approx(1.3)
    # docs/metrics.md formula, every step drafting 4: (1 - 0.5^5) / ((1 - 0.5)(4 * 0.3 + 1.3)) = 1.9375 / 2.5
    assert row["predicted_decode_speedup"] == pytest.approx((1 - 0.5**5) / ((1 - 0.5) * (4 * 0.3 + 1.3)))


def test_the_prediction_of_the_measured_speedup_adds_both_prefills():
    # 40 output tokens with 0.2 s of target prefill (0.005 s/token) and 0.4 s of drafter
    # prefill (0.01); AR decodes 300 tokens in 13.0 - 1.0 s (0.04 s/token); steady state 0.775
    prefilled = dict(SPEC_ATTRIBUTION["forwards"], drafter_prefill={"count": 2, "total_s": 0.4, "rows": 2})
    spec = result(dict(SPEC_ATTRIBUTION, forwards=prefilled), SPEC_THEORY, output_tokens=40)
    row = run_theory(spec, result(AR_ATTRIBUTION, output_tokens=300))
    assert row["predicted_decode_speedup"] == pytest.approx(0.775)
    assert row["predicted_speedup"] == pytest.approx((0.005 + 0.04) / (0.005 + 0.01 + 0.04 / 0.775))
    assert math.isnan(run_theory(SPEC, AR)["predicted_speedup"])  # no output tokens: no throughput prediction


def test_a_host_paced_replay_drafter_costs_its_configured_time_per_draft_token():
    # no drafter forwards: c is the pacing, 10.8 ms per draft token = 0.3 of the AR forward
    paced = result(attribution({"prefill": 0.2, "drafter": None, "verify": 0.936, "accept": 0.05, "other": 1.014}, 20, {"5": (20, 0.936)}),
                   SPEC_THEORY, drafter=DrafterSpec(name="replay", kind="replay", cost_ms_per_token=10.8))
    assert run_theory(paced, AR)["theory_cost_ratio"] == pytest.approx(0.3)
    assert run_theory(paced, AR)["predicted_decode_speedup"] == pytest.approx(run_theory(SPEC, AR)["predicted_decode_speedup"])


def test_waterfall_from_ideal_to_the_cells_step_time():
    row = run_theory(SPEC, AR)
    ideal = 1.9375  # 1 + 0.5 + 0.25 + 0.125 + 0.0625 tokens per step
    assert row["waterfall_ideal"] == pytest.approx(ideal)
    # an AR step is 40 ms; the drafter adds 43.2 ms a step
    assert row["waterfall_drafter"] == pytest.approx(ideal * 0.04 / (0.04 + 0.0432))
    # the 36 ms forward becomes the 46.8 ms verification
    assert row["waterfall_verify"] == pytest.approx(ideal * 0.04 / (0.04 - 0.036 + 0.0468 + 0.0432))
    # the whole step: (2.2 - 0.2) s over 20 steps = 100 ms
    assert row["waterfall_overhead"] == pytest.approx(ideal * 0.04 / 0.1)


def test_no_costs_without_timed_forwards():
    row = run_theory(SPEC, result({"available": False, "reason": "off"}))
    assert all(math.isnan(v) for v in row.values())
    ngram = result(attribution({"prefill": 0.2, "drafter": None, "verify": 0.936, "accept": 0.05, "other": 0.15}, 20, {"5": (20, 0.936)}),
                   SPEC_THEORY)
    row = run_theory(ngram, AR)
    assert row["theory_cost_ratio"] == 0.0  # no draft model: c = 0
    assert row["waterfall_drafter"] == pytest.approx(row["waterfall_ideal"])
    vllm = {"available": True, "forwards": None, "parts_s": dict.fromkeys(("prefill", "drafter", "verify", "accept", "other")), "steps": 9}
    assert math.isnan(run_theory(result(vllm, SPEC_THEORY), AR)["predicted_decode_speedup"])


def test_verification_slope_and_the_papers_formula():
    # v(3) = 1.2, v(5) = 1.4: through (1, 1) the least-squares slope is (2*0.2 + 4*0.4) / (4 + 16) = 0.1
    assert verify_cost_per_token([(3, 1.2), (5, 1.4)]) == pytest.approx(0.1)
    assert paper_speedup(0.8, 3, 0.1, 0.1) == pytest.approx(expected_tokens_per_step(0.8, 3) / (0.3 + 1.3))


def cell(gamma: int, method: str = "speculative") -> Cell:
    return Cell(experiment="x", dataset="d", target=ModelSpec(name="t", source="embedded"), method=method,
                drafter=INT8 if method != "ar" else None, gamma=gamma if method != "ar" else 0, batch_size=1,
                generation=Generation(max_new_tokens=16), placement=Placement(strategy="cpu"), load=Load(), repeat=0, seed=1)


def test_best_gamma_beside_the_best_measured():
    g2 = result(attribution({"prefill": 0.2, "drafter": 0.43, "verify": 0.8, "accept": 0.05, "other": 0.15}, 20,
                            {"3": (20, 0.8)}, {"1": (40, 0.432)}),
                {"alpha": 0.5, "gamma": 2, "longest_draft": 2, "draft_length_shares": [0, 0, 1]})
    runs = [dataclasses.replace(r, config=c) for c, r in ((cell(0, "ar"), AR), (cell(4), SPEC), (cell(2), g2))]
    assert [math.isnan(r["predicted_decode_speedup"]) for r in theory_columns(runs)] == [True, False, False]
    summary = pd.DataFrame({"group_id": [r.config.group_id for r in runs], "speedup": [1.0, 0.7, 0.8]})
    row = best_gamma_table(runs, summary).iloc[0]
    assert row["best_measured_gamma"] == 2 and row["measured"] == "γ2: 0.80; γ4: 0.70"
    # alpha 0.5, c = 0.3 for both; v(3) = 0.04/0.036 = 1.111, v(5) = 1.3
    slope = verify_cost_per_token([(3, 0.04 / 0.036), (5, 1.3)])
    assert row["verify_cost_per_token"] == pytest.approx(slope)
    best = max(range(1, 33), key=lambda g: paper_speedup(0.5, g, 0.3, slope))
    assert row["best_predicted_gamma"] == best == 1


# --- token trees ---------------------------------------------------------------------------


def test_the_tree_formula_of_a_chain_is_the_chain_formula():
    """A chain's nodes all have rank 0, so a(0) = alpha: tau = sum of alpha^i; with the draft
    lengths that happened (10 steps: 2 drafted nothing, 3 one token, 5 two) its nodes weigh
    by how often they were drafted, and the decode step's tokens are Leviathan's over shares."""
    assert tree_tau(TreeShape.chain(4).paths, (0.7,)) == pytest.approx(expected_tokens_per_step(0.7, 4))
    per_position = [PositionCount(1, 8, 6, None, None), PositionCount(2, 5, 3, None, None)]
    nodes = chain_nodes(per_position)
    assert [(n.path, n.tried) for n in nodes] == [((0,), 8), ((0, 0), 5)]
    alpha = positional_acceptance(nodes)[0]
    assert alpha == pytest.approx(per_token_alpha([{"drafted": 8, "accepted": 6}, {"drafted": 5, "accepted": 3}]))
    drafting = tree_tau([n.path for n in nodes], (alpha,), presence(nodes, drafts=8))
    assert 0.2 + 0.8 * drafting == pytest.approx(expected_tokens(alpha, [0.2, 0.3, 0.5]))


def test_a_three_node_tree_by_hand():
    """Root children ranks 0 and 1, rank 0's best child: p = (0.6, 0.5), so the rank-1 child
    is accepted with 0.4 * 0.5 = 0.2: tau = 1 + 0.6 + 0.2 + 0.6 * 0.6."""
    nodes = [NodeCount((0,), 10, 10, 6), NodeCount((1,), 10, 4, 2), NodeCount((0, 0), 10, 6, 4)]
    p = positional_acceptance(nodes)
    assert p == pytest.approx((10 / 16, 0.5))  # rank 0: (6 + 4) / (10 + 6), rank 1: 2 / 4
    assert tree_tau([(0,), (1,), (0, 0)], (0.6, 0.5)) == pytest.approx(1 + 0.6 + 0.2 + 0.36)
    # a node drafted in half its parent's drafts counts half
    assert tree_tau([(0,), (1,)], (0.6, 0.5), {(0,): 1.0, (1,): 0.5}) == pytest.approx(1 + 0.6 + 0.1)


def test_the_greedy_tree_is_the_best_tree_of_each_size():
    """Against every tree of at most 2 ranks and depth 2: the greedy tree of N nodes has the
    highest tau of all trees of N nodes."""
    p = (0.6, 0.5)
    tree = best_tree(p, 6, max_depth=2)
    assert [path for path, _ in tree[:4]] == [(0,), (0, 0), (1,), (0, 1)]
    assert [reach for _, reach in tree[:4]] == pytest.approx([0.6, 0.36, 0.2, 0.12])
    candidates = [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    for n in range(1, 7):
        trees = [c for c in itertools.combinations(candidates, n) if _is_tree(c)]
        assert tree_tau([path for path, _ in tree[:n]], p) == pytest.approx(max(tree_tau(t, p) for t in trees))
    assert [path for path, _ in best_tree((0.9,), 5, max_depth=3)] == [(0,), (0, 0), (0, 0, 0)]  # a chain's: its depth


def _is_tree(paths) -> bool:
    try:
        TreeShape.of(paths)
    except ValueError:
        return False
    return True


TREE = DrafterSpec(name="int8_tree", kind="quantized", dtype="int8", tree=((0,), (1,), (0, 0)))
TREE_THEORY = {"alpha": 0.5, "gamma": 2, "longest_draft": 2, "draft_length_shares": [0, 0, 1]}
# 20 steps verifying 3 nodes (width 4: 43.2 ms, v = 1.2), two drafter levels of 10.8 ms (c = 0.3)
TREE_ATTRIBUTION = attribution({"prefill": 0.2, "drafter": 0.432, "verify": 0.864, "accept": 0.05, "other": 0.15}, 20,
                               {"4": (20, 0.864)}, {"1": (20, 0.216), "2": (20, 0.216)})


def tree_result(per_node: list[dict] | None, drafter: DrafterSpec = TREE) -> Result:
    block = acceptance_block(drafted=60, accepted=16, forwards=24, output_tokens=40,
                             per_position=([20, 20], [12, 4]), per_node=per_node)
    return dataclasses.replace(result(TREE_ATTRIBUTION, TREE_THEORY, output_tokens=40, drafter=drafter),
                               acceptance=Acceptance.from_dict(block))


def test_a_tree_is_priced_by_its_nodes_its_verification_width_and_its_drafters_levels():
    nodes = [{"path": [0], "drafted": 20, "tried": 20, "accepted": 10}, {"path": [1], "drafted": 20, "tried": 10, "accepted": 2},
             {"path": [0, 0], "drafted": 20, "tried": 10, "accepted": 4}]
    row = run_theory(tree_result(nodes), AR)
    # p = (14 / 30, 2 / 10): tau = 1 + p0 + (1 - p0) p1 + p0^2; a step costs 2 levels x 0.3 + v(4) = 1.2
    p0, p1 = 14 / 30, 0.2
    assert row["predicted_tau"] == pytest.approx(1 + p0 + (1 - p0) * p1 + p0**2)
    assert row["theory_cost_ratio"] == pytest.approx(0.3) and row["theory_verify_cost_ratio"] == pytest.approx(1.2)
    assert row["predicted_decode_speedup"] == pytest.approx(row["predicted_tau"] / (2 * 0.3 + 1.2))
    # a rank never tried (a third child drafted only under a rejected node) counts as never accepted
    untried = nodes + [{"path": [1, 0], "drafted": 5, "tried": 0, "accepted": 0}, {"path": [1, 1], "drafted": 5, "tried": 0, "accepted": 0},
                       {"path": [1, 2], "drafted": 5, "tried": 0, "accepted": 0}]
    below = (1 - p0) * p1 * 0.25  # node 1 accepted, then drafted in a quarter of its drafts
    assert run_theory(tree_result(untried), AR)["predicted_tau"] == pytest.approx(row["predicted_tau"] + below * (p0 + (1 - p0) * p1))
    # written before per-node counts: alpha over the depths the tree reached, as a chain of them
    old = run_theory(tree_result(None), AR)
    assert old["predicted_tau"] == pytest.approx(expected_tokens_per_step(0.5, 2))
    assert old["predicted_decode_speedup"] == pytest.approx(expected_tokens_per_step(0.5, 2) / 1.8)


def test_the_best_tree_size_beside_the_measured_chain_and_tree():
    chain = dataclasses.replace(result(SPEC_ATTRIBUTION, SPEC_THEORY, output_tokens=54), config=cell(4))
    tree_cell = dataclasses.replace(cell(2), drafter=TREE)
    nodes = [{"path": [0], "drafted": 20, "tried": 20, "accepted": 10}, {"path": [1], "drafted": 20, "tried": 10, "accepted": 2},
             {"path": [0, 0], "drafted": 20, "tried": 10, "accepted": 4}]
    tree = dataclasses.replace(tree_result(nodes), config=tree_cell)
    chain = dataclasses.replace(chain, acceptance=Acceptance.from_dict(acceptance_block(
        drafted=80, accepted=30, forwards=24, output_tokens=54, per_position=([20] * 4, [12, 9, 6, 3]))))
    runs = [dataclasses.replace(result(AR_ATTRIBUTION, output_tokens=300), config=cell(0, "ar")), chain, tree]
    summary = pd.DataFrame({"group_id": [r.config.group_id for r in runs], "drafter": [None, "int8", "int8_tree"],
                            "speedup": [1.0, 0.7, 0.8], "speedup_ci_low": [1.0, 0.6, 0.7], "speedup_ci_high": [1.0, 0.8, 0.9],
                            "nodes_per_draft": [None, 4.0, 3.0], "mean_acceptance_length": [None, 2.5, 1.8]})
    table, points = best_tree_table(runs, summary)
    row = table.iloc[0]
    # chain and tree pooled: rank 0 (12 + 9 + 6 + 3 + 10 + 4) / (20 + 12 + 9 + 6 + 20 + 10), rank 1 2 / 10
    assert row["acceptance_by_rank"] == f"p0 {44 / 77:.2f} p1 0.20" and row["drafter"] == "int8"
    assert row["measured"] == "int8_tree N3.0: 0.80; int8 N4.0: 0.70"
    curve = points[points["kind"] == "predicted"]
    assert row["best_predicted_speedup"] == pytest.approx(curve["speedup"].max())
    assert list(points.loc[points["kind"] != "predicted", "nodes"]) == [3.0, 4.0]
    assert len(curve) == len(best_tree((44 / 77, 0.2), TREE_NODES_MAX, max_depth=4))
    assert best_tree_table(runs[:2], summary)[0].empty  # a drafter measured only as chains: the gamma table's
