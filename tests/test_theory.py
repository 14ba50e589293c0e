"""The theory's costs from the cells' own timed forwards, against hand-computed values."""

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest

from specdec.gate.cells import Cell, DrafterSpec, Generation, Load, ModelSpec, Placement
from specdec.job.leviathan import expected_tokens_per_step
from specdec.records import read_result
from specdec.result import Attribution, Result, Theory
from specdec.report.theory import best_gamma_table, paper_speedup, run_theory, theory_columns, verify_cost_per_token

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
