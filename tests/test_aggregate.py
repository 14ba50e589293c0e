"""Aggregation on the synthetic results in tests/fixtures/results (see generate.py there).

Expected numbers are worked out by hand from the fixture's values.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specdec.metrics import bootstrap_ci
from specdec.aggregate import (
    NO_BASELINE,
    ResultFileError,
    SettingsError,
    aggregate_experiment,
    failed_table,
    runs_table,
    summary_table,
)

FIXTURES = Path(__file__).parent / "fixtures" / "results"
RESULTS = sorted((FIXTURES / "runs" / "demo").glob("*/result.json"))


def cell(summary: pd.DataFrame, name: str) -> pd.Series:
    rows = summary[summary["cell"] == name]
    assert len(rows) == 1, f"{name}: {len(rows)} rows"
    return rows.iloc[0]


@pytest.fixture(scope="module")
def runs():
    return runs_table(RESULTS)


@pytest.fixture(scope="module")
def summary(runs):
    return summary_table(runs, n_resamples=2000)


def test_bootstrap_ci_by_hand():
    # Two values 1 and 3: resampled medians are 1 (p=1/4), 2 (p=1/2) or 3 (p=1/4), so the
    # 95 % percentile interval is [1, 3]; one value: the interval is that value.
    assert bootstrap_ci([1.0, 3.0], np.median, 0.95, 2000, 0) == (1.0, 3.0)
    assert bootstrap_ci([4.2]) == (4.2, 4.2)


def test_runs_table_is_one_flat_row_per_run(runs):
    assert len(runs) == len(RESULTS) == 14
    row = runs[runs["cell"] == "humaneval--speculative-int8--g4-b1-n16-t0-cpu--r1"].iloc[0]
    assert row["throughput_tok_s"] == 18.0
    assert row["ttft_s_p50"] == pytest.approx(0.1) and row["e2e_s_p99"] == pytest.approx(20 / 18)
    assert row["acceptance_rate"] == 0.7 and row["predicted_speedup"] == 1.6
    assert row["energy_j_per_token"] == 80.0 / 64
    assert row["meta_torch"] == "2.13.0" and row["placement_strategy"] == "cpu"
    assert json.loads(row["acceptance_per_position"])[0]["position"] == 1
    # Energy not measured stays missing, never 0.
    ngram = runs[runs["method"] == "ngram"].iloc[0]
    assert not ngram["energy_available"] and pd.isna(ngram["energy_j_per_token"])
    assert set(runs["status"]) == {"ok", "failed"}


def test_speedup_and_energy_ratio_against_matching_ar(summary):
    spec = cell(summary, "humaneval--speculative-int8--g4-b1-n16-t0-cpu")
    assert spec["n_repeats"] == 2
    # tokens/s 15 and 18: median 16.5, interval [15, 18].
    assert (spec["throughput_tok_s"], spec["throughput_tok_s_ci_low"]) == (16.5, 15.0)
    assert spec["throughput_tok_s_ci_high"] == 18.0
    # Against AR 10 and 12 (repeats paired): 15/10 = 18/12 = 1.5.
    assert spec["speedup"] == pytest.approx(1.5)
    assert (spec["speedup_ci_low"], spec["speedup_ci_high"]) == pytest.approx((1.5, 1.5))
    assert spec["predicted_speedup"] == 1.6 and spec["acceptance_rate"] == pytest.approx(0.65)
    # Energy/token: spec 96/64 = 1.5 and 80/64 = 1.25, AR 128/64 = 2 -> ratios 0.75, 0.625.
    assert spec["energy_j_per_token"] == pytest.approx(1.375)
    assert spec["energy_ratio"] == pytest.approx(0.6875)
    assert (spec["energy_ratio_ci_low"], spec["energy_ratio_ci_high"]) == pytest.approx(
        (0.625, 0.75)
    )
    assert spec["baseline"] == "humaneval--ar--b1-n16-t0-cpu"


def test_matching_respects_batch_size_load_and_repeat(summary):
    # Batch 4 is matched with AR batch 4 (30 tokens/s), not batch 1.
    assert cell(summary, "humaneval--speculative-int8--g4-b4-n16-t0-cpu")["speedup"] == 1.2
    # Open loop at 2/s is matched with AR at 2/s.
    rate2 = cell(summary, "humaneval--speculative-int8--g4-b1-n16-t0-cpu-rate2")
    assert rate2["baseline"] == "humaneval--ar--b1-n16-t0-cpu-rate2"
    # One repeat (r0): paired with AR r0 -> 13/10, interval is the value itself.
    g2 = cell(summary, "humaneval--speculative-int8--g2-b1-n16-t0-cpu")
    assert (g2["n_repeats"], g2["speedup"], g2["speedup_ci_low"]) == (1, 1.3, 1.3)


def test_unpaired_repeat_uses_ar_median(tmp_path):
    # AR 10, 12 (median 11); spec repeats 15, 18 and an extra r2 at 22 -> 1.5, 1.5, 2.0.
    source = FIXTURES / "runs/demo/humaneval--speculative-int8--g4-b1-n16-t0-cpu--r0/result.json"
    extra = json.loads(source.read_text())
    extra["config"].update(repeat=2, cell=extra["config"]["cell"].replace("--r0", "--r2"))
    extra["metrics"]["throughput_tok_s"] = 22.0
    path = tmp_path / "result.json"
    path.write_text(json.dumps(extra))
    summary = summary_table(runs_table([*RESULTS, path]), n_resamples=500)
    spec = cell(summary, "humaneval--speculative-int8--g4-b1-n16-t0-cpu")
    assert spec["n_repeats"] == 3 and spec["speedup"] == pytest.approx(1.5)
    assert spec["speedup_ci_high"] == pytest.approx(2.0)


def test_no_ar_baseline_is_said_not_invented(summary, tmp_path):
    mtbench = cell(summary, "mtbench--speculative-int8--g4-b1-n16-t0-cpu")
    assert mtbench["baseline"] == NO_BASELINE
    assert pd.isna(mtbench["speedup"]) and pd.isna(mtbench["energy_ratio"])
    aggregate_experiment(RESULTS, tmp_path, "demo", n_resamples=200)
    md = (tmp_path / "summary.md").read_text()
    line = next(row for row in md.splitlines() if row.startswith("| mtbench"))
    assert line.count(NO_BASELINE) == 2  # speedup and energy ratio


def test_failed_runs_have_their_own_table_and_stay_out_of_averages(runs, summary):
    failed = failed_table(runs)
    assert failed.to_dict("records") == [
        {
            "experiment": "demo",
            "cell": "humaneval--ngram--g4-b1-n16-t0-cpu--r1",
            "status": "failed",
            "type": "OutOfMemoryError",
            "message": "CUDA out of memory",
            "phase": "decode",
        }
    ]
    ngram = cell(summary, "humaneval--ngram--g4-b1-n16-t0-cpu")
    # The failed r1 also claims 11 tokens/s; only r0 counts.
    assert (ngram["n_repeats"], ngram["n_failed"], ngram["repeats"]) == (1, 1, "0")
    assert "1 failed" in ngram["flags"]


def test_repeats_that_disagree_are_flagged(runs):
    # AR 10 and 12 tokens/s: coefficient of variation 0.129.
    strict = cell(
        summary_table(runs, cv_threshold=0.1, n_resamples=100), "humaneval--ar--b1-n16-t0-cpu"
    )
    loose = cell(
        summary_table(runs, cv_threshold=0.2, n_resamples=100), "humaneval--ar--b1-n16-t0-cpu"
    )
    assert strict["unstable"] and "throughput_tok_s cv=0.13" in strict["flags"]
    assert not loose["unstable"]


def test_written_tables(tmp_path):
    written = aggregate_experiment(RESULTS, tmp_path, "demo", n_resamples=200)
    assert {p.name for paths in written.values() for p in paths} == {
        f"{stem}.{ext}"
        for stem in ("runs", "summary", "failed", "run_info")
        for ext in ("csv", "md", "html")
    }
    html = (tmp_path / "summary.html").read_text()
    assert "<style>" in html and '<table class="dataframe specdec">' in html
    md = (tmp_path / "summary.md").read_text()
    spec = next(
        r
        for r in md.splitlines()
        if r.startswith("| humaneval--speculative-int8--g4-b1-n16-t0-cpu ")
    )
    assert "16.5 [15, 18]" in spec and "0.688 [0.625, 0.75]" in spec
    ngram = next(r for r in md.splitlines() if r.startswith("| humaneval--ngram"))
    assert "1.1 (n=1)" in ngram and "| –" in ngram  # energy: a dash, not 0
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert csv["energy_j_per_token"].isna().sum() == len(csv) - 2  # AR b1 and spec g4 b1
    info = pd.read_csv(tmp_path / "run_info.csv").set_index("field")["value"]
    assert info["runs"] == "14 (13 ok)" and info["transformers"] == "5.24.0"


def test_only_failed_runs_give_an_empty_summary(tmp_path):
    failed = [p for p in RESULTS if json.loads(p.read_text())["status"] != "ok"]
    aggregate_experiment(failed, tmp_path, "demo")
    assert pd.read_csv(tmp_path / "summary.csv").empty
    assert "No successful runs" in (tmp_path / "summary.html").read_text()
    assert len(pd.read_csv(tmp_path / "failed.csv")) == 1


def test_bad_input_names_the_file_and_key(tmp_path):
    broken = json.loads(RESULTS[0].read_text())
    del broken["config"]["method"]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ResultFileError, match=r"result\.json: missing key 'config\.method'"):
        runs_table([path])
    path.write_text("{not json")
    with pytest.raises(ResultFileError, match="cannot read result JSON"):
        runs_table([path])
    with pytest.raises(ResultFileError, match="no result files"):
        runs_table([])
    with pytest.raises(SettingsError, match=r"aggregate: unknown key\(s\) \['cv'\]"):
        summary_table(runs_table(RESULTS[:1]), cv=0.2)
    with pytest.raises(ResultFileError, match="include \\['demo'\\]"):
        aggregate_experiment(RESULTS[:1], tmp_path, "other")
