"""The report of what training a head bought: payback, the acceptance a head needs to pay,
and the table and curve written from training records and an experiment's tables."""

import math

import pandas as pd
import pytest

from specdec.job.leviathan import expected_tokens_per_step
from specdec.report import columns as col
from specdec.report.heads import alpha_to_pay, heads_table, payback_tokens, write_heads

RECORD = {"kind": "eagle3", "parameters": 9808128, "tokens": 49176, "seconds": 490.0,
          "corpus": {"sources": ["chitchat", "python_stdlib"], "documents": {"chitchat": 40}, "held_out_tokens": 8192,
                     "excluded_datasets": ["humaneval"]},
          "curve": [{"tokens": 0, "seconds": 0, "train_loss": None, "held_out_loss": 27.0, "acceptance": [0.02, 0.01, 0.0]},
                    {"tokens": 49176, "seconds": 490, "train_loss": 13.9, "held_out_loss": 13.7, "acceptance": [0.18, 0.1, 0.07]}]}


def test_payback_is_the_training_time_over_the_time_saved_per_token():
    # 10 tok/s with the head at 2x: AR took 0.2 s a token, the head 0.1 s: 100 s back in 1000 tokens
    assert payback_tokens(100.0, 10.0, 2.0) == pytest.approx(1000.0)
    assert math.isinf(payback_tokens(100.0, 10.0, 0.9))


def test_the_acceptance_a_head_needs_is_where_leviathans_speedup_crosses_one():
    needed = alpha_to_pay(0.05, 1.1, 3)
    assert expected_tokens_per_step(needed, 3) > 3 * 0.05 + 1.1 >= expected_tokens_per_step(needed - 0.002, 3)
    assert alpha_to_pay(0.0, 1.0, 1) < 0.002  # a free draft verified at no extra cost pays at any acceptance above 0
    assert alpha_to_pay(2.0, 1.0, 1) == 1.0  # a draft dearer than the target's step never pays


def test_the_table_pairs_each_trained_heads_cells_with_its_training(tmp_path):
    summary = pd.DataFrame([
        {col.GROUP_ID: "default/h--eagle", col.DRAFTER: "eagle", col.DATASET: "humaneval", col.ENGINE: "specdec",
         col.GAMMA: 3, col.THEORY_COST_RATIO: 0.045, col.ACCEPTANCE_RATE: 0.04, col.MEAN_ACCEPTED_LENGTH: 1.11,
         col.SPEEDUP: 2.0, f"{col.SPEEDUP}_ci_low": 0.6, col.THROUGHPUT_TOK_S: 9.3},
        {col.GROUP_ID: "default/h--ngram", col.DRAFTER: "ngram", col.DATASET: "humaneval", col.ENGINE: "specdec",
         col.GAMMA: 4, col.THEORY_COST_RATIO: 0.0, col.ACCEPTANCE_RATE: 0.3, col.MEAN_ACCEPTED_LENGTH: 1.5,
         col.SPEEDUP: 1.2, col.THROUGHPUT_TOK_S: 15.0},
    ])
    runs = pd.DataFrame([{col.GROUP_ID: "default/h--eagle", col.STATUS: "ok", "theory_verify_cost_ratio": 1.3, "theory_alpha": 0.04}])
    table = heads_table({"eagle": RECORD}, summary, runs)
    assert list(table["head"]) == ["eagle"] and table.loc[0, "training_tokens"] == 49176
    assert table.loc[0, "held_out_acceptance"] == 0.18 and table.loc[0, "alpha"] == 0.04
    assert table.loc[0, "needed_alpha"] == pytest.approx(alpha_to_pay(0.045, 1.3, 3))
    assert math.isinf(table.loc[0, "payback_tokens"])  # 2x, but not distinguishable from AR: nothing is paid back
    # a tree that drafts with eagle's head (`head: eagle`) gets eagle's training beside its own cell
    tree = summary.iloc[[0]].assign(**{col.GROUP_ID: "default/h--eagle_tree", col.DRAFTER: "eagle_tree"})
    both = heads_table({"eagle": RECORD}, pd.concat([summary, tree]), runs, {"eagle_tree": "eagle"})
    assert list(both["head"]) == ["eagle", "eagle_tree"] and list(both["training_tokens"]) == [49176, 49176]
    written = write_heads({"eagle": RECORD}, summary, runs, tmp_path / "heads", tmp_path / "curve", "default")
    assert "never (not faster than AR)" in (tmp_path / "heads.md").read_text()
    assert (tmp_path / "curve" / "training_curve.png").stat().st_size > 0 and len(written) == 5
