"""Aggregation on the synthetic results in tests/fixtures/results (see generate.py there).

Expected numbers are worked out by hand from the fixture's values.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specdec.report.aggregate import (
    ExperimentError,
    aggregate_experiment,
    failed_table,
    not_supported_table,
    read_runs,
    request_tables,
    runs_table,
)
from specdec.gate.cells import Cell
from specdec.records import RecordError, read_result, result_from_dict, write_requests, write_result
from specdec.report.statistics import bootstrap_ci
from specdec.report.summary import NO_BASELINE, SettingsError, category_table, summary_table
from specdec.report.sweeps import break_even_table
from specdec.report.tables import DASH, NOT_DISTINGUISHABLE, display_headline, write_headline
from specdec.report.theory import best_gamma_table

FIXTURES = Path(__file__).parent / "fixtures" / "results"
RESULTS = sorted((FIXTURES / "runs" / "demo").glob("*/result.json"))
SPEC = "humaneval--specdec-speculative-int8-g4--b1-n16-t0-cpu"
AR = "humaneval--specdec-ar--b1-n16-t0-cpu"


def cell(summary: pd.DataFrame, name: str) -> pd.Series:
    rows = summary[summary["cell"] == name]
    assert len(rows) == 1, f"{name}: {len(rows)} rows"
    return rows.iloc[0]


@pytest.fixture(scope="module")
def runs():
    return runs_table(read_runs(RESULTS))


@pytest.fixture(scope="module")
def summary(runs):
    return summary_table(runs, n_resamples=2000)


def test_bootstrap_ci_by_hand():
    # Two values 1 and 3: resampled medians are 1 (p=1/4), 2 (p=1/2) or 3 (p=1/4), so the
    # 95 % percentile interval is [1, 3]; one value: the interval is that value.
    assert bootstrap_ci([1.0, 3.0], np.median, 0.95, 2000, 0) == (1.0, 3.0)
    assert bootstrap_ci([4.2]) == (4.2, 4.2)


def test_every_fixture_validates_through_the_contract():
    assert len(RESULTS) == 18
    for path in RESULTS:
        result = read_result(path)
        parsed = result.config
        assert (parsed.id, parsed.group_id) == (result.cell_id, result.group_id)
        # the typed result writes back the dict it was read from (older cells gain their defaults)
        assert result.to_dict() == json.loads(path.read_text()) | {"config": parsed.to_dict()}
        assert path.parent.name == parsed.name


def test_runs_table_is_one_flat_row_per_run(runs):
    assert len(runs) == len(RESULTS) == 18
    row = runs[runs["cell"] == f"{SPEC}--r1"].iloc[0]
    assert row["throughput_tok_s"] == 18.0
    assert row["ttft_s_p50"] == pytest.approx(0.1) and row["e2e_s_p99"] == pytest.approx(20 / 18)
    assert row["acceptance_rate"] == 0.7
    # the fixture's forwards: AR one-token 40 ms, verification 52 ms (v = 1.3), drafter 12 ms
    # (c = 0.3); alpha 0.65, every step drafting 4: (1 - 0.65^5) / ((1 - 0.65)(4 * 0.3 + 1.3))
    assert (row["theory_cost_ratio"], row["theory_verify_cost_ratio"]) == pytest.approx((0.3, 1.3))
    assert row["predicted_decode_speedup"] == pytest.approx((1 - 0.65**5) / (0.35 * 2.5))
    # with the prefills, per output token of 64: target 0.4 s, drafter 0.12 s; AR decodes
    # (3.2533 - 0.4) s without its prefill
    p, p_d, d = 0.4 / 64, 0.12 / 64, (3.2533333333333334 - 0.4) / 64
    assert row["predicted_speedup"] == pytest.approx((p + d) / (p + p_d + d / row["predicted_decode_speedup"]))
    assert row["energy_j_per_token"] == 80.0 / 64
    assert row["meta_torch"] == "2.13.0" and row["placement_strategy"] == "cpu"
    assert (row["cell_name"], row["group_id"], row["ar_group_id"]) == (SPEC, f"demo/{SPEC}", f"demo/{AR}")
    assert (row["drafter"], row["gamma"], row["load"], row["method_label"]) == ("int8", 4, "closed", "speculative (int8)")
    ar = runs[runs["cell"] == f"{AR}--r0"].iloc[0]
    assert ar["gamma"] == 0 and pd.isna(ar["drafter"])
    # Energy not measured stays missing, never 0.
    ngram = runs[runs["method"] == "ngram"].iloc[0]
    assert not ngram["energy_available"] and pd.isna(ngram["energy_j_per_token"])
    assert set(runs["status"]) == {"ok", "failed", "not_supported"}


def test_speedup_and_energy_ratio_against_matching_ar(summary):
    spec = cell(summary, SPEC)
    assert spec["n_repeats"] == 2
    # tokens/s 15 and 18: median 16.5, interval [15, 18].
    assert (spec["throughput_tok_s"], spec["throughput_tok_s_ci_low"]) == (16.5, 15.0)
    assert spec["throughput_tok_s_ci_high"] == 18.0
    # Against AR 10 and 12 (repeats paired): 15/10 = 18/12 = 1.5.
    assert spec["speedup"] == pytest.approx(1.5)
    assert (spec["speedup_ci_low"], spec["speedup_ci_high"]) == pytest.approx((1.5, 1.5))
    assert spec["predicted_speedup"] == pytest.approx(0.97278, abs=1e-5)  # test_runs_table_is_one_flat_row_per_run
    assert spec["acceptance_rate"] == pytest.approx(0.65)
    # Energy/token: spec 96/64 = 1.5 and 80/64 = 1.25, AR 128/64 = 2 -> ratios 0.75, 0.625.
    assert spec["energy_j_per_token"] == pytest.approx(1.375)
    assert spec["energy_ratio"] == pytest.approx(0.6875)
    assert (spec["energy_ratio_ci_low"], spec["energy_ratio_ci_high"]) == pytest.approx(
        (0.625, 0.75)
    )
    assert spec["baseline"] == AR


def test_matching_respects_batch_size_load_and_repeat(summary):
    # Batch 4 is matched with AR batch 4 (30 tokens/s), not batch 1.
    assert cell(summary, "humaneval--specdec-speculative-int8-g4--b4-n16-t0-cpu")["speedup"] == 1.2
    # Open loop at 2/s is matched with AR at 2/s; at 1/s with the AR cell of as many requests.
    rate2 = cell(summary, f"{SPEC}-rate2-poissonn4")
    assert rate2["baseline"] == f"{AR}-rate2-poissonn4"
    rate1 = cell(summary, f"{SPEC}-rate1-poissonn4")
    assert (rate1["baseline"], rate1["speedup"]) == (f"{AR}-rate1-poissonn4", 1.5)
    # One repeat (r0): paired with AR r0 -> 13/10, interval is the value itself.
    g2 = cell(summary, "humaneval--specdec-speculative-int8-g2--b1-n16-t0-cpu")
    assert (g2["n_repeats"], g2["speedup"], g2["speedup_ci_low"]) == (1, 1.3, 1.3)


def test_open_loop_cells_that_differ_only_in_size_are_separate_rows(summary):
    # Same rate and arrival, 4 and 8 requests: two cells, not two repeats of one.
    n4, n8 = cell(summary, f"{AR}-rate1-poissonn4"), cell(summary, f"{AR}-rate1-poissonn8")
    assert (n4["n_repeats"], n4["throughput_tok_s"]) == (1, 10.0)
    assert (n8["n_repeats"], n8["throughput_tok_s"]) == (1, 11.0)
    assert n4["load"] == n8["load"] == "open 1.0/s poisson"


def test_unpaired_repeat_uses_ar_median(tmp_path):
    # AR 10, 12 (median 11); spec repeats 15, 18 and an extra r2 at 22 -> 1.5, 1.5, 2.0.
    extra = read_result(FIXTURES / f"runs/demo/{SPEC}--r0/result.json").to_dict()
    spec = dataclasses.replace(Cell.from_dict(extra["config"]), repeat=2)
    extra.update(cell_id=spec.id, config=spec.to_dict())
    extra["metrics"]["throughput_tok_s"] = 22.0
    path = tmp_path / "result.json"
    write_result(path, result_from_dict(extra, "test"))
    summary = summary_table(runs_table(read_runs([*RESULTS, path])), n_resamples=500)
    spec = cell(summary, SPEC)
    assert spec["n_repeats"] == 3 and spec["speedup"] == pytest.approx(1.5)
    assert spec["speedup_ci_high"] == pytest.approx(2.0)


def test_no_ar_baseline_is_said_not_invented(summary, tmp_path):
    mtbench = cell(summary, "mtbench--specdec-speculative-int8-g4--b1-n16-t0-cpu")
    assert mtbench["baseline"] == NO_BASELINE
    assert pd.isna(mtbench["speedup"]) and pd.isna(mtbench["energy_ratio"])
    aggregate_experiment(RESULTS, tmp_path, "demo", n_resamples=200)
    md = (tmp_path / "summary.md").read_text()
    line = next(row for row in md.splitlines() if row.startswith("| mtbench"))
    assert line.count(NO_BASELINE) == 3  # speedup, E2E speedup and energy ratio


def test_failed_runs_have_their_own_table_and_stay_out_of_averages(runs, summary):
    failed = failed_table(runs)
    assert failed.to_dict("records") == [
        {
            "experiment": "demo",
            "cell": "humaneval--specdec-ngram-ngram-g4--b1-n16-t0-cpu--r1",
            "status": "failed",
            "type": "OutOfMemoryError",
            "message": "CUDA out of memory",
            "phase": "decode",
        }
    ]
    ngram = cell(summary, "humaneval--specdec-ngram-ngram-g4--b1-n16-t0-cpu")
    # The failed r1 also claims 11 tokens/s; only r0 counts.
    assert (ngram["n_repeats"], ngram["n_failed"], ngram["repeats"]) == (1, 1, "0")
    assert "1 failed" in ngram["flags"]


def test_not_supported_cells_have_their_own_table(runs, summary):
    rows = not_supported_table(runs).to_dict("records")
    assert [(r["cell"], r["status"], r["type"]) for r in rows] == [
        ("humaneval--transformers-speculative-int8-g4--b4-n16-t0-cpu--r0", "not_supported", "NotSupported")
    ]
    assert "batch size 1 only" in rows[0]["message"]
    assert not summary["engine"].eq("transformers").any()
    assert summary["n_failed"].sum() == 1  # the n-gram repeat only


def test_other_engines_compare_with_their_own_ar_and_with_ours(summary):
    # vLLM AR 14 tok/s, its n-gram 16; our AR 10 (repeat 0) and 12
    ngram = cell(summary, "humaneval--vllm-ngram-ngram-g4--b1-n16-t0-cpu")
    assert ngram["engine"] == "vllm" and ngram["method_label"] == "vllm: ngram (ngram)"
    assert ngram["baseline"] == "humaneval--vllm-ar--b1-n16-t0-cpu"
    assert ngram["speedup"] == pytest.approx(16 / 14)
    assert ngram["speedup_vs_specdec_ar"] == pytest.approx(16 / 10)  # paired with repeat 0
    ours = cell(summary, SPEC)
    assert ours["speedup_vs_specdec_ar"] == ours["speedup"]


def test_repeats_that_disagree_are_flagged(runs):
    # AR 10 and 12 tokens/s: coefficient of variation 0.129.
    strict = cell(summary_table(runs, cv_threshold=0.1, n_resamples=100), AR)
    loose = cell(summary_table(runs, cv_threshold=0.2, n_resamples=100), AR)
    assert strict["unstable"] and "throughput_tok_s cv=0.13" in strict["flags"]
    assert not loose["unstable"]


def test_written_tables(tmp_path):
    written = aggregate_experiment(RESULTS, tmp_path, "demo", n_resamples=200)
    assert {p.name for paths in written.values() for p in paths} == {
        f"{stem}.{ext}"
        for stem in ("runs", "summary", "categories", "break_even", "capacity", "gamma", "trees", "tree_size", "failed",
                     "not_supported", "run_info")
        for ext in ("csv", "md", "html")
    } | {f"{stem}.csv" for stem in ("requests", "itl", "positions", "tree_sizes", "power")} | {"headline.html", "headline.md"}
    html = (tmp_path / "summary.html").read_text()
    assert "<style>" in html and '<table class="dataframe specdec">' in html
    md = (tmp_path / "summary.md").read_text()
    spec = next(r for r in md.splitlines() if r.startswith(f"| {SPEC} "))
    assert "16.5 [15, 18]" in spec and "0.688 [0.625, 0.75]" in spec
    ar = next(r for r in md.splitlines() if r.startswith(f"| {AR} "))
    assert ar.split("|")[3].strip() == "–"  # gamma of AR: a dash
    ngram = next(r for r in md.splitlines() if r.startswith("| humaneval--specdec-ngram"))
    # predicted: (1 - 0.65^5) / (0.35 * 1.3) = 1.943 in the steady state, with the target's
    # prefill (0.4 s / 64 tokens) and AR's decode (2.8533 s / 64): 1.74; energy: a dash, not 0
    assert "1.74 (n=1)" in ngram and "| –" in ngram
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert csv["energy_j_per_token"].isna().sum() == len(csv) - 2  # AR b1 and spec g4 b1
    info = pd.read_csv(tmp_path / "run_info.csv").set_index("field")["value"]
    assert info["runs"] == "18 (16 ok)" and info["transformers"] == "5.24.0"
    assert "acceptance_per_position" not in pd.read_csv(tmp_path / "runs.csv")
    assert "batch size 1 only" in (tmp_path / "not_supported.html").read_text()


def test_energy_per_accepted_draft_token(runs, summary):
    # int8 gamma 4 batch 1: 96 J over 24 accepted draft tokens (rate 0.6 of 40), 80 J over 28.
    spec = runs[runs["cell_name"] == SPEC].set_index("repeat")["energy_j_per_accepted_token"]
    assert spec.tolist() == pytest.approx([4.0, 80 / 28])
    row = cell(summary, SPEC)
    assert row["energy_j_per_accepted_token"] == pytest.approx((4.0 + 80 / 28) / 2)
    assert row["energy_j_per_token"] == pytest.approx((1.5 + 1.25) / 2)
    # AR accepts no draft token, the n-gram cell measured no energy: missing, never 0.
    assert pd.isna(cell(summary, AR)["energy_j_per_accepted_token"])
    assert runs.loc[runs["method"] == "ngram", "energy_j_per_accepted_token"].isna().all()


def test_category_results_by_hand():
    # One AR and one speculative repeat over three requests, two `code` and one `prose`.
    runs = pd.DataFrame(
        [
            {"status": "ok", "cell": "ar--r0", "cell_name": "ar", "group_id": "g/ar", "ar_group_id": "g/ar", "method": "ar", "repeat": 0},
            {"status": "ok", "cell": "sd--r0", "cell_name": "sd", "group_id": "g/sd", "ar_group_id": "g/ar", "method": "speculative", "repeat": 0},
        ]
    ).assign(method_label="m", dataset="d", gamma=4, batch_size=1, load="closed")
    requests = pd.DataFrame(
        [
            # run, request, category, output tokens, e2e (s), drafted, accepted, forwards
            ("ar--r0", "a", "code", 10, 2.0, 0, 0, 10),
            ("ar--r0", "b", "code", 30, 4.0, 0, 0, 30),
            ("ar--r0", "c", "prose", 20, 2.0, 0, 0, 20),
            ("sd--r0", "a", "code", 10, 1.0, 8, 6, 4),
            ("sd--r0", "b", "code", 30, 2.0, 16, 14, 8),
            ("sd--r0", "c", "prose", 20, 4.0, 12, 3, 10),
            ("sd--r0", "d", "prose", 5, 1.0, 4, 1, 3),  # no AR partner: not in the speedup
        ],
        columns=["cell", "request_id", "category", "output_tokens", "e2e_s", "drafted_tokens", "accepted_tokens", "target_forwards"],
    )
    table = category_table(runs, requests).set_index("category")
    assert list(table.index) == ["code", "prose"] and set(table["cell"]) == {"sd"}  # AR has no row
    # code: (40 tokens / 3 s) over (40 / 6 s) = 2; acceptance 20/24; length 40 tokens / 12 forwards
    assert table.loc["code", "speedup"] == pytest.approx(2.0)
    assert table.loc["code", "acceptance_rate"] == pytest.approx(20 / 24)
    assert table.loc["code", "mean_accepted_length"] == pytest.approx(40 / 12)
    # prose: only request c pairs: (20 / 4) / (20 / 2) = 0.5; acceptance and length over c and d
    assert table.loc["prose", "speedup"] == pytest.approx(0.5)
    assert (table.loc["prose", "n_requests"], table.loc["prose", "speedup_requests"]) == (2, 1)
    assert table.loc["prose", "acceptance_rate"] == pytest.approx(4 / 16)
    assert table.loc["prose", "mean_accepted_length"] == pytest.approx(25 / 13)
    # Without its AR cell: no speedup, said so.
    alone = category_table(runs[runs["method"] != "ar"], requests)
    assert alone["speedup"].isna().all() and set(alone["baseline"]) == {NO_BASELINE}


def test_category_table_of_the_fixtures(tmp_path):
    aggregate_experiment(RESULTS, tmp_path, "demo", n_resamples=100)
    table = pd.read_csv(tmp_path / "categories.csv")
    spec = table[table["cell"] == SPEC].set_index("category")
    # Two repeats of two requests per category, each paired with the AR run of its repeat:
    # E2E 1.1 and 0.9333 s (15 gaps of 1/15 and 1/18 s after a 0.1 s TTFT) against 1.6 and
    # 1.35 s, 16 tokens each, so the speedup is (1.6 + 1.35) / (1.1 + 0.9333).
    assert spec["speedup"].tolist() == pytest.approx([2.95 / (1.1 + 0.1 + 15 / 18)] * 2, abs=1e-5)
    assert spec["n_requests"].tolist() == [4, 4] and spec["speedup_requests"].tolist() == [4, 4]
    assert spec["acceptance_rate"].tolist() == pytest.approx([0.8, 0.4])
    mtbench = table[table["dataset"] == "mtbench"]
    assert mtbench["speedup"].isna().all() and set(mtbench["baseline"]) == {NO_BASELINE}
    assert "no AR baseline" in (tmp_path / "categories.md").read_text()


def test_tables_for_the_figures(tmp_path):
    aggregate_experiment(RESULTS, tmp_path, "demo", n_resamples=100)
    requests = pd.read_csv(tmp_path / "requests.csv")
    # Four measured requests (warm-up left out) per ok run, none for failed ones.
    assert len(requests) == 4 * 16 and "w#1" not in set(requests["request_id"])
    spec = requests[requests["cell"] == f"{SPEC}--r0"]
    assert list(spec["category"]) == ["code", "code", "writing", "writing"]
    assert list(spec["accepted_tokens"]) == [8, 8, 4, 4] and set(spec["drafted_tokens"]) == {10}
    assert spec["ttft_s"].tolist() == pytest.approx([0.1] * 4)
    itl = pd.read_csv(tmp_path / "itl.csv")
    assert len(itl) == 4 * 16 * 15  # 16 emissions per request
    assert itl.loc[itl["cell"] == f"{SPEC}--r0", "itl_s"].tolist() == pytest.approx([1 / 15] * 60, abs=1e-5)
    positions = pd.read_csv(tmp_path / "positions.csv")
    g2 = positions[positions["cell_name"] == "humaneval--specdec-speculative-int8-g2--b1-n16-t0-cpu"]
    assert g2[["position", "drafted", "accepted"]].values.tolist() == [[1, 10, 10], [2, 10, 6]]
    assert positions["cell"].str.startswith("humaneval--specdec-ar").sum() == 0
    power = pd.read_csv(tmp_path / "power.csv")
    assert set(power["cell"]) == {f"{AR}--r0", f"{AR}--r1", f"{SPEC}--r0", f"{SPEC}--r1"}
    assert list(power.columns) == ["cell", "cell_name", "repeat", "t_s", "phase", "device", "power_w"]


def test_request_latencies_by_hand(tmp_path):
    write_result(tmp_path / "result.json", read_result(FIXTURES / f"runs/demo/{AR}--r0/result.json"))
    request = {
        "request_id": "a#1",
        "prompt_id": "a",
        "category": None,
        "turn": 1,
        "warmup": False,
        "prompt_tokens": 5,
        "output_tokens": 6,
        "arrival_s": 0.2,
        "start_s": 0.2,
        "first_token_s": 0.5,
        "finish_s": 1.0,
        "emissions": [[0.5, 1], [0.7, 3], [1.0, 2]],
    }
    write_requests(tmp_path / "requests.jsonl", [request])
    requests, itl = request_tables(read_runs([tmp_path / "result.json"]))
    row = requests.iloc[0]
    assert row["ttft_s"] == pytest.approx(0.3) and row["e2e_s"] == pytest.approx(0.8)
    assert row["tpot_s"] == pytest.approx(0.1) and pd.isna(row["drafted_tokens"])
    assert itl["itl_s"].tolist() == pytest.approx([0.2, 0.3])


def test_only_failed_runs_give_an_empty_summary(tmp_path):
    failed = [p for p in RESULTS if json.loads(p.read_text())["status"] != "ok"]
    aggregate_experiment(failed, tmp_path, "demo")
    assert pd.read_csv(tmp_path / "summary.csv").empty
    assert "No successful runs" in (tmp_path / "summary.html").read_text()
    assert "No drafting cell ran successfully." in (tmp_path / "headline.html").read_text()
    assert len(pd.read_csv(tmp_path / "failed.csv")) == 1
    assert len(pd.read_csv(tmp_path / "not_supported.csv")) == 1
    for stem in ("requests", "itl", "positions", "power"):
        table = pd.read_csv(tmp_path / f"{stem}.csv")
        assert table.empty and "cell" in table.columns


def test_bad_input_names_the_file_and_key(tmp_path):
    broken = json.loads(RESULTS[0].read_text())
    del broken["config"]["method"]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(RecordError, match=r"result\.json: \$\.config: 'method' is a required property"):
        read_runs([path])
    path.write_text("{not json")
    with pytest.raises(RecordError, match="result.json: cannot read JSON"):
        read_runs([path])
    with pytest.raises(ExperimentError, match="no result files"):
        read_runs([])
    with pytest.raises(SettingsError, match=r"aggregate: unknown key\(s\) \['cv'\]"):
        summary_table(runs_table(read_runs(RESULTS[:1])), cv=0.2)
    with pytest.raises(ExperimentError, match=r"result\.json: not a result of experiment 'other'"):
        aggregate_experiment(RESULTS[:1], tmp_path, "other")


def test_unreadable_power_samples_name_the_file(tmp_path):
    source = FIXTURES / f"runs/demo/{AR}--r0"
    write_result(tmp_path / "result.json", read_result(source / "result.json"))
    (tmp_path / "power.csv").write_text("t_s,power_w\n0,1\n")
    with pytest.raises(RecordError, match=r"power\.csv: missing column\(s\) \['device', 'phase'\]"):
        aggregate_experiment([tmp_path / "result.json"], tmp_path / "tables", "demo", n_resamples=10)


def test_break_even_reads_speedup_along_batch_size_and_rate(summary):
    table = break_even_table(summary).set_index(["axis", "method_label"])
    batch = table.loc[("batch_size", "speculative (int8)")]
    # batch 1: 1.5, batch 4: 36/30 = 1.2; it pays at both
    assert batch["points"].startswith("1: 1.50") and batch["break_even"].startswith("> 4")
    rate = table.loc[("load_rate", "speculative (int8)")]
    assert rate["metric"] == "latency_speedup" and rate["break_even"].startswith("> 2")


def test_headline_gives_each_drafting_cells_speedup_prediction_and_break_even(summary, tmp_path):
    shown, shared = display_headline(summary)
    # AR is the baseline, not a row; every fixture cell runs 16 new tokens at T 0.
    assert "ar" not in set(shown["method"]) and shared == "Every cell: T 0, new tokens 16."
    assert list(shown.columns) == ["method", "dataset", "γ", "batch", "load", "speedup [95 % CI]", "vs AR", "predicted",
                                   "acceptance", "mean accepted length", "c", "flags"]
    rows = {tuple(row[:5]): row[5:] for row in shown.itertuples(index=False)}
    # int8 gamma 4 batch 1: 1.5 over two repeats, its interval above 1; predicted
    # (1 - 0.65^5) / (0.35 (1.2 + 1.3)) with the prefills (test_runs_table_is_one_flat_row_per_run),
    # and why: acceptance 0.65, the drafter's forward 0.3 of the target's
    speedup, against, predicted, acceptance, _, c, flags = rows[("speculative (int8)", "humaneval", "4", "1", "closed")]
    assert (speedup, against, predicted, acceptance, c) == ("1.5 [1.5, 1.5]", "faster", "0.973", "0.65", "0.3")
    assert "cv=0.13" in flags
    # under an open load the answer is the E2E latency ratio, 16/10 against 16/15 (one repeat,
    # and this summary has no requests to bootstrap: no interval to tell it from AR)
    assert rows[("speculative (int8)", "humaneval", "4", "1", "open 1.0/s poisson")][:2] == ("1.5 (n=1) (E2E)", DASH)
    no_ar = rows[("speculative (int8)", "mtbench", "4", "1", "closed")]
    assert no_ar[:2] == (NO_BASELINE, DASH) and no_ar[2] == DASH and "outside load" in no_ar[-1]
    assert rows[("ngram (ngram)", "humaneval", "4", "1", "closed")][-1] == "1 failed"
    assert rows[("ngram (ngram)", "humaneval", "4", "1", "closed")][5] == "0"  # a model-free drafter costs no forward
    # an interval that includes 1 is marked; one wholly below 1 is slower
    spec = (summary["method"] == "speculative") & (summary["gamma"] == 2)
    wide = summary.assign(speedup_ci_low=summary["speedup_ci_low"].mask(spec, 0.9),
                          speedup_ci_high=summary["speedup_ci_high"].mask(spec, 1.4))
    assert display_headline(wide)[0].set_index("γ").loc["2", "vs AR"] == NOT_DISTINGUISHABLE
    below = wide.assign(speedup_ci_high=wide["speedup_ci_high"].mask(spec, 0.95))
    assert display_headline(below)[0].set_index("γ").loc["2", "vs AR"] == "slower"

    html, md = write_headline(summary, break_even_table(summary), tmp_path / "headline", "demo")
    fragment = html.read_text()
    # a fragment for the report's first page: no document of its own, styles scoped to it
    assert fragment.startswith("<div class='specdec-headline'>") and "<body" not in fragment
    assert "demo: speedup over AR" in fragment and "1.5 [1.5, 1.5]" in fragment
    assert "Where speculation stops paying" in fragment and "&gt; 4 (CI &gt; 4 to &gt; 4)" in fragment
    assert "| speculative (int8)  | humaneval |   4 |       1 | closed" in md.read_text()


def test_one_repeat_takes_its_interval_from_the_requests(runs):
    requests, _ = request_tables(read_runs(RESULTS))
    ngram = "humaneval--specdec-ngram-ngram-g4--b1-n16-t0-cpu"
    # spread the n-gram run's request times: the paired ratios now differ request by request
    rows = requests["cell"] == f"{ngram}--r0"
    requests.loc[rows, "e2e_s"] = requests.loc[rows, "e2e_s"] * [0.8, 1.0, 1.2, 1.4]
    row = cell(summary_table(runs, requests, n_resamples=500), ngram)
    assert row["n_repeats"] == 1 and row["speedup"] == pytest.approx(1.1)
    assert row["speedup_ci_low"] < 1.1 < row["speedup_ci_high"]
    without = cell(summary_table(runs, n_resamples=500), ngram)
    assert without["speedup_ci_low"] == without["speedup_ci_high"] == pytest.approx(1.1)


def test_a_cell_measured_under_outside_load_is_flagged(summary):
    # the fixture's MT-bench cell ran while other processes took 60 % of the 2 CPUs
    mtbench = cell(summary, "mtbench--specdec-speculative-int8-g4--b1-n16-t0-cpu")
    assert mtbench["outside_load"] and "r0 outside load: other processes used 60% of 2 CPUs" in mtbench["flags"]
    assert not cell(summary, SPEC)["outside_load"]


def test_waterfall_and_gamma_from_the_fixtures_forwards(runs, summary):
    row = runs[runs["cell"] == f"{SPEC}--r0"].iloc[0]
    ideal = sum(0.65**i for i in range(5))
    assert row["waterfall_ideal"] == pytest.approx(ideal)
    # generate.attribution, AR: 60 steps of 40 ms, prefill 0.4 s, accept 0.128 s, other a
    # ninth of the rest; gamma 4: 20 steps of 52 ms, drafter 0.12 + 80 x 0.012 s, accept 0.048 s
    ar_step = ((0.4 + 2.4 + 0.128) * 10 / 9 - 0.4) / 60
    spec_step = ((0.4 + 1.08 + 1.04 + 0.048) * 10 / 9 - 0.4) / 20
    assert row["waterfall_drafter"] == pytest.approx(ideal * ar_step / (ar_step + 1.08 / 20))
    assert row["waterfall_verify"] == pytest.approx(ideal * ar_step / (ar_step - 0.04 + 1.04 / 20 + 1.08 / 20))
    assert row["waterfall_overhead"] == pytest.approx(ideal * ar_step / spec_step)
    table = best_gamma_table([r.result for r in read_runs(RESULTS)], summary)
    int8 = table[(table["drafter"] == "int8") & (table["batch_size"] == 1) & (table["dataset"] == "humaneval") & (table["load"] == "closed")].iloc[0]
    assert int8["measured"] == "γ2: 1.30; γ4: 1.50" and int8["best_measured_gamma"] == 4
    # alpha 0.65, c = 0.3, v = 1.3 at both widths -> slope 0.3 / 2 and 0.3 / 4 fitted
    assert int8["alpha"] == pytest.approx(0.65) and int8["cost_ratio"] == pytest.approx(0.3)
