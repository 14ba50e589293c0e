"""Break-even, goodput and capacity on hand-made tables: every expected number is worked out
by hand in the comments."""

import math

import numpy as np
import pandas as pd
import pytest

from specdec.report.goodput import Slo, run_goodput
from specdec.report.statistics import paired_ratio_ci
from specdec.report.summary import SETTING_COLUMNS
from specdec.report.sweeps import break_even_table, capacity, capacity_table, crossing


def test_crossing_interpolates_between_the_last_paying_point_and_the_next():
    # 1.4 at 2 and 0.6 at 4: half-way, linearly 3; in log2 2^(1.5) = 2.83
    assert crossing([1, 2, 4], [1.6, 1.4, 0.6]) == ("3", 3.0)
    assert crossing([1, 2, 4], [1.6, 1.4, 0.6], log_x=True)[1] == pytest.approx(2**1.5)
    # a dip under 1 that recovers: the last paying point is the one that counts
    assert crossing([1, 2, 4, 8], [0.9, 1.2, 1.1, 0.9])[1] == pytest.approx(4 + 0.5 * 4)
    for ys, expected in (([1.2, 1.1], "> 2"), ([0.8, 0.7], "< 1")):
        text, value = crossing([1, 2], ys)
        assert text == expected and math.isnan(value)


def test_capacity_is_the_highest_rate_served_within_five_percent():
    # offered 1, 2, 4: goodput 1.0 (served), 1.92 (96 %: served), 2.5 (62 %: not)
    assert capacity([1, 2, 4], [1.0, 1.92, 2.5]) == ("2", 2.0)
    assert capacity([1, 2], [0.99, 1.99])[0] == ">= 2"
    assert capacity([1, 2], [0.5, 0.5])[0] == "< 1"


def summary_row(**values):
    row = dict.fromkeys(SETTING_COLUMNS)
    row.update(experiment="sweep", dataset="d", target="t", engine="specdec", max_new_tokens=32, temperature=0.0,
               top_k=0, top_p=1.0, placement_strategy="cpu", load="closed", load_mode="closed")
    row.update(values)
    row["group_id"] = "/".join(str(v) for v in values.values())
    return row


def test_break_even_table_reads_each_series_along_its_axis():
    rows = []
    for batch, (s, lo, hi) in zip((1, 2, 4), ((1.5, 1.3, 1.7), (1.2, 0.9, 1.4), (0.8, 0.7, 0.9))):
        rows.append(summary_row(method="speculative", drafter="bf16", method_label="speculative (bf16)", gamma=4,
                                batch_size=batch, speedup=s, speedup_ci_low=lo, speedup_ci_high=hi))
    for rate, s in ((1.0, 1.3), (2.0, 1.1)):
        rows.append(summary_row(method="ngram", drafter="ngram", method_label="ngram (ngram)", gamma=4, batch_size=1,
                                load=f"open {rate}/s poisson", load_mode="open", load_arrival="poisson", load_rate=rate,
                                latency_speedup=s, latency_speedup_ci_low=s - 0.1, latency_speedup_ci_high=s + 0.1))
    rows.append(summary_row(method="ar", method_label="ar", gamma=0, batch_size=2, speedup=1.0))
    table = break_even_table(pd.DataFrame(rows)).set_index("axis")
    batch = table.loc["batch_size"]
    # median: 1.2 at 2, 0.8 at 4 -> half-way in log2: 2^1.5; low bound: 1.3 at 1, 0.9 at 2
    # -> 1 + 0.75 in log2 = 2^0.75; high bound: 1.4 at 2, 0.9 at 4 -> 2^(1 + 0.8)
    assert batch["break_even_value"] == pytest.approx(2**1.5)
    assert batch["break_even_low"] == pytest.approx(2**0.75) and batch["break_even_high"] == pytest.approx(2**1.8)
    assert batch["metric"] == "speedup" and batch["points"].startswith("1: 1.50 [1.30, 1.70]")
    rate = table.loc["load_rate"]
    assert rate["metric"] == "latency_speedup" and rate["break_even"].startswith("> 2")


def test_goodput_counts_requests_meeting_every_slo_per_second():
    requests = pd.DataFrame({
        "cell": ["a"] * 4,
        "ttft_s": [0.1, 0.2, 0.6, 0.1],
        "tpot_s": [0.05, np.nan, 0.05, 0.2],  # the second is a one-token output: meets TPOT
        "e2e_s": [1.0, 0.2, 1.0, 3.0],
    })
    slo = Slo.from_config({"ttft_ms": 500, "tpot_ms": 100})
    table = run_goodput(requests, pd.Series({"a": 4.0}), slo).set_index("cell").loc["a"]
    # TTFT misses the third, TPOT the fourth: 2 of 4 meet both, in a 4 s window
    assert (table["slo_ttft_met"], table["slo_tpot_met"], table["slo_met"]) == (0.75, 0.75, 0.5)
    assert table["goodput_req_s"] == 0.5 and pd.isna(table["slo_e2e_met"])
    assert slo.describe() == "TTFT ≤ 500 ms, TPOT ≤ 100 ms"
    with pytest.raises(ValueError, match="unknown key"):
        Slo.from_config({"itl_ms": 5})


def test_capacity_table_sets_ar_and_methods_side_by_side():
    rows = [
        summary_row(method=m, drafter=d, method_label=m, gamma=g, batch_size=1, load=f"open {r}/s poisson",
                    load_mode="open", load_arrival="poisson", load_rate=r, goodput_req_s=good, slo_met=good / r)
        for m, d, g, goods in (("ar", None, 0, (1.0, 1.5)), ("ngram", "ngram", 4, (1.0, 1.95)))
        for r, good in zip((1.0, 2.0), goods)
    ]
    table = capacity_table(pd.DataFrame(rows)).set_index("method_label")["capacity"]
    assert table.to_dict() == {"ar": "1 req/s", "ngram": ">= 2 req/s"}


def test_paired_ratio_ci_over_requests():
    # the same 3 requests, each exactly twice as fast: every draw gives 2, the CI is a point
    cell = {"x": np.array([1.0, 2.0, 3.0])}
    base = {"x": np.array([2.0, 4.0, 6.0])}
    ratio = lambda c, b: b["x"].mean(-1) / c["x"].mean(-1)
    assert paired_ratio_ci(cell, base, ratio, estimate=2.0) == pytest.approx((2.0, 2.0))
    # unequal per-request ratios spread the interval around the estimate it is given
    low, high = paired_ratio_ci(cell, {"x": np.array([2.0, 2.0, 9.0])}, ratio, estimate=1.5, n_resamples=500)
    assert low < 1.5 < high
