import math

import numpy as np
import pytest

from specdec.job.acceptance import acceptance, acceptance_block
from specdec.job.console import summary_table
from specdec.job.leviathan import draft_length_shares, expected_tokens_per_step, per_token_alpha, predicted_speedup, theory
from specdec.job.metrics import MetricsError, distribution, percentile, summarize
from specdec.report.statistics import bootstrap_ci, coefficient_of_variation


def record(rid, arrival, start, emissions, prompt_tokens=10, warmup=False, **extra):
    return {
        "request_id": rid,
        "warmup": warmup,
        "prompt_tokens": prompt_tokens,
        "output_tokens": sum(n for _, n in emissions),
        "arrival_s": arrival,
        "start_s": start,
        "first_token_s": emissions[0][0],
        "finish_s": emissions[-1][0],
        "emissions": emissions,
        **extra,
    }


@pytest.fixture
def records():
    return [
        record("warm", -1.0, -1.0, [[-0.9, 1], [-0.5, 5]], prompt_tokens=99, warmup=True),
        record("a", 0.0, 0.0, [[0.1, 1], [0.3, 2], [0.4, 1]], prompt_tokens=10),
        record("b", 0.5, 1.0, [[1.2, 1], [1.5, 3]], prompt_tokens=20),
        record("c", 1.0, 1.5, [[2.0, 1]], prompt_tokens=30),
    ]


def test_summarize_hand_computed(records):
    m = summarize(records)
    assert m["num_requests"] == 3  # warm-up excluded
    assert m["output_tokens"] == 9
    assert m["prompt_tokens"] == 60
    assert m["window_s"] == pytest.approx(2.0)
    assert m["throughput_tok_s"] == pytest.approx(4.5)
    assert m["throughput_req_s"] == pytest.approx(1.5)
    # TTFT 0.1, 0.7, 1.0
    assert m["ttft_s"]["mean"] == pytest.approx(0.6)
    assert m["ttft_s"]["p50"] == pytest.approx(0.7)
    assert m["ttft_s"]["p90"] == pytest.approx(0.94)
    assert m["ttft_s"]["p99"] == pytest.approx(0.994)
    # TPOT: a (0.4-0.1)/3, b (1.0-0.7)/3; c has one token: excluded
    assert m["tpot_s"]["count"] == 2
    assert m["tpot_s"]["mean"] == pytest.approx(0.1)
    # one gap per emission: 0.2, 0.1 (a), 0.3 (b)
    assert m["itl_s"]["count"] == 3
    assert m["itl_s"]["mean"] == pytest.approx(0.2)
    assert m["itl_s"]["p50"] == pytest.approx(0.2)
    # per token: a 0.1, 0.1, 0.1; b 0.1, 0.1, 0.1
    assert m["itl_token_s"]["count"] == 6
    assert m["itl_token_s"]["p99"] == pytest.approx(0.1)
    assert m["e2e_s"]["mean"] == pytest.approx(0.8)
    assert m["queue_s"]["mean"] == pytest.approx(1 / 3)
    # output tokens / (finish - start): 4/0.4, 4/0.5, 1/0.5
    assert m["request_tok_s"]["p50"] == pytest.approx(8.0)
    assert m["request_tok_s"]["mean"] == pytest.approx(20 / 3)


def test_summarize_without_measured_requests_is_an_error(records):
    with pytest.raises(MetricsError, match="no measured"):
        summarize(records[:1])


def test_missing_field_names_request_and_key(records):
    del records[2]["first_token_s"]
    with pytest.raises(MetricsError, match=r"'b'.*first_token_s"):
        summarize(records)


def test_distribution_hand_numbers():
    d = distribution([4, 1, 3, 2])
    assert d == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97, "count": 4})


def test_distribution_empty_is_null():
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}


@pytest.mark.parametrize("q", [0, 100, -5, 120])
def test_percentile_outside_open_interval_is_an_error(q):
    with pytest.raises(MetricsError, match="outside"):
        percentile([1, 2, 3], q)


def test_distribution_rejects_nan():
    with pytest.raises(MetricsError, match="ttft_s"):
        distribution([1.0, math.nan], "ttft_s")


def spec_records():
    return [
        record("w", 0, 0, [[0.1, 9]], warmup=True, drafted_tokens=50, accepted_tokens=50,
               target_forwards=1, drafted_per_position=[9, 9], accepted_per_position=[9, 9]),
        record("a", 0, 0, [[0.1, 1], [0.2, 3], [0.3, 2]], drafted_tokens=4, accepted_tokens=3,
               target_forwards=3, drafted_per_position=[2, 2], accepted_per_position=[2, 1]),
        record("b", 0, 0, [[0.1, 1], [0.2, 1]], drafted_tokens=2, accepted_tokens=0,
               target_forwards=2, drafted_per_position=[1, 1], accepted_per_position=[0, 0]),
    ]


def test_acceptance_hand_computed():
    block = acceptance(spec_records(), gamma=2)
    assert block["drafted_tokens"] == 6
    assert block["accepted_tokens"] == 3
    assert block["target_forwards"] == 5
    assert block["acceptance_rate"] == pytest.approx(0.5)
    assert block["mean_accepted_length"] == pytest.approx(8 / 5)
    assert block["per_position"] == [
        {"position": 1, "drafted": 3, "accepted": 2, "rate": pytest.approx(2 / 3), "rate_per_draft": pytest.approx(2 / 3)},
        {"position": 2, "drafted": 3, "accepted": 1, "rate": pytest.approx(1 / 3), "rate_per_draft": pytest.approx(1 / 3)},
    ]
    # trials: 3 at position 1, 2 (accepted at 1) at position 2
    assert per_token_alpha(block["per_position"]) == pytest.approx(3 / 5)


def test_acceptance_under_vllm_names_by_hand():
    """3 drafts (a: two of 2 tokens, keeping 2 and 1; b: one of 2, keeping 0)."""
    block = acceptance(spec_records(), gamma=2)
    assert block["num_drafts"] == 3
    assert block["mean_acceptance_length"] == pytest.approx(1 + 3 / 3)  # bonus token included
    assert block["accepted_per_step"] == [1, 1, 1]  # kept 0, 1 and 2 tokens once each
    assert block["nodes_per_draft"] == pytest.approx(6 / 3) and "per_node" not in block  # chains: no per-node counts


def test_per_node_counts_sum_over_measured_rows_in_path_order():
    rows = spec_records()
    for row, counts in zip(rows, ({"0": [9, 9, 9]}, {"1": [2, 1, 0], "0": [2, 2, 2], "0.0": [2, 2, 1]},
                                  {"0": [1, 1, 0], "0.0": [1, 0, 0]})):
        row["per_node"] = counts
    assert acceptance(rows, gamma=2)["per_node"] == [  # the warm-up row left out
        {"path": [0], "drafted": 3, "tried": 3, "accepted": 2}, {"path": [1], "drafted": 2, "tried": 1, "accepted": 0},
        {"path": [0, 0], "drafted": 3, "tried": 2, "accepted": 1},
    ]


def test_vllm_per_position_acceptance_divides_by_drafts_not_by_position_drafts():
    # n-gram-like: 4 drafts, only 2 of them long enough to reach position 2
    block = acceptance_block(drafted=6, accepted=4, forwards=10, output_tokens=14, per_position=([4, 2], [3, 1]))
    assert [p["rate"] for p in block["per_position"]] == pytest.approx([3 / 4, 1 / 2])
    assert [p["rate_per_draft"] for p in block["per_position"]] == pytest.approx([3 / 4, 1 / 4])
    assert block["accepted_per_step"] == [1, 2, 1] and block["mean_acceptance_length"] == pytest.approx(2.0)
    assert acceptance_block(1, 0, 1, 1, None)["num_drafts"] is None


def test_acceptance_none_without_drafting():
    assert acceptance(spec_records(), gamma=None) is None
    assert acceptance(spec_records(), gamma=0) is None


def test_acceptance_wrong_position_count_names_request():
    with pytest.raises(MetricsError, match=r"'a'.*drafted_per_position.*gamma = 3"):
        acceptance(spec_records(), gamma=3)


def test_prediction_at_alpha_zero_is_pure_overhead():
    # every step drafts 4 tokens and keeps none: 1 token for 4 c + v
    assert predicted_speedup(0.0, 0.25, 1.0, [0, 0, 0, 0, 1]) == pytest.approx(1 / (4 * 0.25 + 1))


def test_prediction_alpha_one_limit():
    assert expected_tokens_per_step(1.0, 4) == 5
    assert predicted_speedup(1.0, 0.25, 1.0, [0, 0, 0, 0, 1]) == pytest.approx(5 / 2)
    assert predicted_speedup(1 - 1e-12, 0.25, 1.0, [0, 0, 0, 0, 1]) == pytest.approx(2.5, rel=1e-9)


def test_prediction_is_the_readme_formula_when_every_step_drafts_gamma():
    # docs/metrics.md: (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + v)); alpha 0.8, gamma 3, c 0.1
    assert expected_tokens_per_step(0.8, 3) == pytest.approx(2.952)
    assert predicted_speedup(0.8, 0.1, 1.0, [0, 0, 0, 1]) == pytest.approx(0.5904 / (0.2 * 1.3))
    assert predicted_speedup(0.8, 0.1, 1.3, [0, 0, 0, 1]) == pytest.approx(0.5904 / (0.2 * 1.6))


@pytest.mark.parametrize("args, match", [((1.5, 0.1, 1.0, [0, 1]), "alpha"), ((0.5, -1, 1.0, [0, 1]), "costs"),
                                         ((0.5, 0.1, 0.0, [0, 1]), "costs")])
def test_prediction_rejects_bad_inputs(args, match):
    with pytest.raises(MetricsError, match=match):
        predicted_speedup(*args)


def test_theory_block():
    block = theory(alpha=0.8, gamma=3, shares=[0, 0, 0, 1])
    assert block == {"alpha": 0.8, "gamma": 3, "longest_draft": 3, "draft_length_shares": [0, 0, 0, 1]}
    assert predicted_speedup(0.8, 0.1, 1.3, [0, 0, 0, 1]) == pytest.approx(1.845)


def test_bootstrap_ci_deterministic_and_tight():
    sample = np.random.default_rng(7).normal(10.0, 0.01, size=200)
    low, high = bootstrap_ci(sample, seed=3)
    assert (low, high) == bootstrap_ci(sample, seed=3)
    assert (low, high) != bootstrap_ci(sample, seed=4)
    assert low <= np.median(sample) <= high and high - low < 0.01
    low_mean, high_mean = bootstrap_ci(sample, statistic=np.mean, confidence=0.5, seed=3)
    assert low_mean < np.mean(sample) < high_mean


def test_bootstrap_ci_covers_true_median_about_95_percent():
    rng = np.random.default_rng(5)
    covered = [
        low <= 10.0 <= high
        for low, high in (bootstrap_ci(rng.normal(10.0, 0.01, 101), n_resamples=500, seed=s)
                          for s in range(100))
    ]
    assert 0.85 <= np.mean(covered) <= 1.0


def test_bootstrap_rejects_empty_and_bad_confidence():
    with pytest.raises(MetricsError):
        bootstrap_ci([])
    with pytest.raises(MetricsError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)


def test_coefficient_of_variation():
    assert coefficient_of_variation([9.0, 10.0, 11.0]) == pytest.approx(0.1)
    assert coefficient_of_variation([5.0]) is None


def test_summary_table_renders_values(records):
    text = summary_table(summarize(records), title="cell")
    assert "TTFT" in text and "600.00" in text  # mean TTFT in ms
    assert "3 requests, 9 output tokens in 2.00 s: 4.50 tok/s, 1.500 req/s" in text


def test_draft_length_shares_from_per_position_counts():
    # 10 steps: 4 drafted nothing, 2 drafted one token, 4 drafted two
    per_position = [{"drafted": 6, "accepted": 5}, {"drafted": 4, "accepted": 2}]
    assert draft_length_shares(per_position, steps=10) == pytest.approx([0.4, 0.2, 0.4])
    with pytest.raises(MetricsError, match="do not fit"):
        draft_length_shares(per_position, steps=5)


def test_prediction_over_draft_lengths():
    # by hand: half the steps draft nothing (1 token, cost 1), half draft 2 of at most 4
    # (1 + 0.5 + 0.25 tokens, cost 2 * 0.1 + 1 + 0.6 * 2 / 4)
    expected = (0.5 * 1 + 0.5 * 1.75) / (0.5 * 1 + 0.5 * 1.5)
    assert predicted_speedup(0.5, 0.1, 1.6, [0.5, 0, 0.5, 0, 0]) == pytest.approx(expected)
    assert theory(alpha=0.5, gamma=4, shares=[0.5, 0, 0.5, 0, 0])["draft_length_shares"] == [0.5, 0, 0.5, 0, 0]


def test_prediction_uses_the_draft_lengths_that_happened_not_the_nominal_gamma():
    # gamma 32 asked, but no step drafted more than 2: the shares stop at 2, and the
    # verification cost v (measured for 3 tokens) is interpolated over 0 .. 2 drafts
    per_position = [{"drafted": 6, "accepted": 5}, {"drafted": 4, "accepted": 2}] + [{"drafted": 0, "accepted": 0}] * 30
    shares = draft_length_shares(per_position, steps=10)
    assert shares == pytest.approx([0.4, 0.2, 0.4])
    # tokens: 0.4 * 1 + 0.2 * (1 + a) + 0.4 * (1 + a + a^2); cost: 0.4 + 0.2 (c + 1 + (v-1)/2) + 0.4 (2c + v)
    a, c, v = 0.6, 0.2, 1.4
    expected = (0.4 + 0.2 * 1.6 + 0.4 * 1.96) / (0.4 + 0.2 * (0.2 + 1 + 0.2) + 0.4 * (0.4 + 1.4))
    block = theory(alpha=a, gamma=32, shares=shares)
    assert block["longest_draft"] == 2 and block["gamma"] == 32
    assert predicted_speedup(a, c, v, shares) == pytest.approx(expected)


def test_alpha_of_variable_length_drafts_counts_only_positions_drafted():
    # 4 steps drafted one token (3 accepted), 2 steps drafted two (both accepted twice):
    # position 2 was tried in 2 steps, not in the 5 that accepted position 1
    per_position = [{"drafted": 6, "accepted": 5}, {"drafted": 2, "accepted": 2}]
    assert per_token_alpha(per_position) == pytest.approx(7 / 8)
