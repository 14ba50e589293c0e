"""Latency, throughput and acceptance metrics, defined once for the whole project.

All times are seconds relative to the start of the measured window (see docs/contracts.md).
Warm-up requests (`"warmup": true`) never enter any metric.

| Metric | Definition |
|---|---|
| TTFT `ttft_s` | `first_token_s - arrival_s`: arrival (open loop) or batch start (closed loop) to the target's first output token on the host (end of prefill; never a draft token). Includes queueing. |
| ITL `itl_s` | Gaps between successive emissions of one request. A speculative step that emits k tokens at once contributes ONE gap (what a streaming client sees: bursts, not a smoothed rate). |
| Per-token ITL `itl_token_s` | Each emission after the first charges its gap evenly to its tokens: an emission of k tokens after a gap g contributes k values g/k. Its token-weighted mean is `(last - first emission) / (tokens after the first emission)`, so it is directly comparable between AR (k = 1) and speculative decoding. |
| TPOT `tpot_s` | `(e2e_s - ttft_s) / (output_tokens - 1)`. Undefined for 1-token outputs: those are excluded; their number is `num_requests - tpot_s.count`. |
| E2E `e2e_s` | `finish_s - arrival_s` (finish = the request's last emission). Includes queueing. |
| Queueing delay `queue_s` | `start_s - arrival_s` (0 in closed loop). |
| Per-request rate `request_tok_s` | `output_tokens / (finish_s - start_s)`: the rate the engine served the request at once admitted (queueing is reported separately). |
| Window `window_s` | First arrival to last finish over measured (non-warm-up) requests. |
| Throughput `throughput_tok_s`, `throughput_req_s` | Output tokens (requests) of measured requests divided by `window_s`. |
| Acceptance rate | `accepted_tokens / drafted_tokens` over measured requests. |
| Mean accepted length | `output_tokens / target_forwards`: tokens emitted per target forward, prefill forward included (AR: 1; speculative: up to gamma + 1). |
| Per-position rate | `accepted / drafted` at draft position i (1-based); position i counts as accepted only when positions 1..i all were. |

Distributions (`DIST`) hold mean, p50, p90, p99 (numpy linear-interpolation percentiles) and
the count of values; the statistics are null when the count is 0.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


class MetricsError(ValueError):
    """Records or parameters that cannot yield a metric; the message names the field."""


# ---------------------------------------------------------------- distributions


def _as_array(values: Iterable[float], name: str = "values") -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1:
        raise MetricsError(f"{name}: expected a flat list of numbers")
    if not np.all(np.isfinite(array)):
        raise MetricsError(f"{name}: contains NaN or infinite values")
    return array


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0 < q < 100, linear interpolation); None for no values."""
    if not 0 < q < 100:
        raise MetricsError(f"percentile {q} is outside (0, 100)")
    array = _as_array(values)
    return float(np.percentile(array, q)) if array.size else None


def distribution(values: Iterable[float], name: str = "values") -> dict:
    """DIST: {"mean", "p50", "p90", "p99", "count"}; statistics null when empty."""
    array = _as_array(values, name)
    dist = {"mean": float(array.mean()) if array.size else None}
    for q in PERCENTILES:
        dist[f"p{q}"] = percentile(array, q)
    dist["count"] = int(array.size)
    return dist


# ------------------------------------------------------------ per-request values


def measured(records: Iterable[dict]) -> list[dict]:
    """The records that count: everything but warm-up requests."""
    return [record for record in records if not record.get("warmup", False)]


def _field(record: dict, key: str):
    try:
        return record[key]
    except KeyError:
        raise MetricsError(
            f"request {record.get('request_id', '?')!r}: missing field {key!r}"
        ) from None


def ttft(record: dict) -> float:
    return _field(record, "first_token_s") - _field(record, "arrival_s")


def e2e(record: dict) -> float:
    return _field(record, "finish_s") - _field(record, "arrival_s")


def queueing_delay(record: dict) -> float:
    return _field(record, "start_s") - _field(record, "arrival_s")


def tpot(record: dict) -> float | None:
    """Time per output token after the first; None for outputs of one token or fewer."""
    tokens = _field(record, "output_tokens")
    if tokens < 2:
        return None
    return (e2e(record) - ttft(record)) / (tokens - 1)


def request_tokens_per_s(record: dict) -> float | None:
    service = _field(record, "finish_s") - _field(record, "start_s")
    return _field(record, "output_tokens") / service if service > 0 else None


def emission_gaps(record: dict) -> list[float]:
    """One gap per emission after the first, however many tokens it carried."""
    times = [time for time, _ in _field(record, "emissions")]
    return [later - earlier for earlier, later in zip(times, times[1:])]


def token_gaps(record: dict) -> list[float]:
    """Per-token ITL: each emission's gap split evenly over the tokens it carried."""
    emissions = _field(record, "emissions")
    gaps = []
    for (earlier, _), (later, count) in zip(emissions, emissions[1:]):
        gaps.extend([(later - earlier) / count] * count)
    return gaps


# -------------------------------------------------------------------- summaries


def service_time(rows: Sequence[dict]) -> float:
    """Seconds during which any of `rows` was in service: the union of their start..finish
    intervals (a batch's rows overlap; gaps between batches do not count)."""
    total, reach = 0.0, -math.inf
    for start, finish in sorted((_field(r, "start_s"), _field(r, "finish_s")) for r in rows):
        total += max(0.0, finish - max(start, reach))
        reach = max(reach, finish)
    return total


def summarize(records: Sequence[dict], window: str = "span") -> dict:
    """The `metrics` block of a result from per-request records (warm-up excluded).

    `window` is what throughput divides by: `span`, the first arrival to the last finish;
    `service`, the time the records' own requests were in service (`service_time`), for an
    interleaved cell, whose span also holds its AR reference's requests."""
    rows = measured(records)
    if not rows:
        raise MetricsError("no measured (non-warm-up) requests to summarize")
    if window == "service":
        window_s = service_time(rows)
    else:
        window_s = max(_field(r, "finish_s") for r in rows) - min(_field(r, "arrival_s") for r in rows)
    if window_s <= 0:
        raise MetricsError(f"measured window is {window_s} s; finish must follow arrival")
    output_tokens = sum(_field(r, "output_tokens") for r in rows)
    tpots = [value for value in map(tpot, rows) if value is not None]
    rates = [value for value in map(request_tokens_per_s, rows) if value is not None]
    return {
        "num_requests": len(rows),
        "output_tokens": output_tokens,
        "prompt_tokens": sum(_field(r, "prompt_tokens") for r in rows),
        "window_s": window_s,
        "window": window,
        "throughput_tok_s": output_tokens / window_s,
        "throughput_req_s": len(rows) / window_s,
        "ttft_s": distribution(map(ttft, rows), "ttft_s"),
        "tpot_s": distribution(tpots, "tpot_s"),
        "itl_s": distribution((g for r in rows for g in emission_gaps(r)), "itl_s"),
        "itl_token_s": distribution((g for r in rows for g in token_gaps(r)), "itl_token_s"),
        "e2e_s": distribution(map(e2e, rows), "e2e_s"),
        "queue_s": distribution(map(queueing_delay, rows), "queue_s"),
        "request_tok_s": distribution(rates, "request_tok_s"),
    }


def _rate(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _per_position(rows: list[dict], gamma: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Drafted and accepted counts per draft position, summed over rows; None for engines
    without per-position counts (transformers' assisted generate)."""
    drafted = np.zeros(gamma, dtype=int)
    accepted = np.zeros(gamma, dtype=int)
    for row in rows:
        for key, total in (("drafted_per_position", drafted), ("accepted_per_position", accepted)):
            counts = row.get(key)
            if counts is None:
                return None
            if len(counts) != gamma:
                raise MetricsError(
                    f"request {row.get('request_id', '?')!r}: {key} has {len(counts)} "
                    f"entries, expected gamma = {gamma}"
                )
            total += counts
    return drafted, accepted


def acceptance_block(drafted: int, accepted: int, forwards: int, output_tokens: int,
                     per_position: tuple[Sequence[int], Sequence[int]] | None) -> dict:
    """The `acceptance` block from its counts, under our names and under vLLM's.

    Ours: acceptance rate = accepted / drafted; mean accepted length = output tokens per
    target forward (the prefill counts). vLLM's (its spec-decode metrics): a *draft* is a
    step that proposed at least one token; mean acceptance length = 1 + accepted / drafts
    (the bonus token included); per-position acceptance = accepted at position i / drafts;
    `accepted_per_step[k]` = drafts that kept exactly k tokens. Acceptance stops at the first
    rejection, so the drafts keeping at least k tokens are those accepted at position k."""
    block = {
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "target_forwards": forwards,
        "acceptance_rate": _rate(accepted, drafted),
        "mean_accepted_length": _rate(output_tokens, forwards),
        "per_position": [],
        "num_drafts": None,
        "mean_acceptance_length": None,
        "accepted_per_step": [],
    }
    if per_position is None:
        return block
    by_position, kept = (list(map(int, counts)) for counts in per_position)
    drafts = by_position[0] if by_position else 0
    at_least = [drafts, *kept, 0]
    return block | {
        "per_position": [
            {"position": i + 1, "drafted": d, "accepted": a, "rate": _rate(a, d), "rate_per_draft": _rate(a, drafts)}
            for i, (d, a) in enumerate(zip(by_position, kept))
        ],
        "num_drafts": drafts,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "accepted_per_step": [a - b for a, b in zip(at_least, at_least[1:])],
    }


def acceptance(records: Sequence[dict], gamma: int | None) -> dict | None:
    """The `acceptance` block of measured records; None for methods that draft nothing."""
    if not gamma:
        return None
    rows = measured(records)
    return acceptance_block(
        drafted=sum(_field(r, "drafted_tokens") for r in rows),
        accepted=sum(_field(r, "accepted_tokens") for r in rows),
        forwards=sum(_field(r, "target_forwards") for r in rows),
        output_tokens=sum(_field(r, "output_tokens") for r in rows),
        per_position=_per_position(rows, gamma),
    )


def per_token_alpha(per_position: Sequence[dict]) -> float | None:
    """Estimate Leviathan's alpha (the i.i.d. per-token acceptance probability).

    `accepted / drafted` is biased low as an alpha: after the first rejection the later
    drafts have no chance. Position i is tried only when positions 1..i-1 were accepted,
    so the maximum-likelihood alpha of a truncated geometric is
    sum(accepted_i) / sum(trials_i) with trials_1 = drafted_1, trials_i = accepted_(i-1).
    Exact when every step drafts gamma tokens (model drafters); when draft lengths vary
    (n-gram), trials_i = min(accepted_(i-1), drafted_i), which counts a step whose shorter
    draft was wholly accepted as a trial of the next position only when the counts force it.
    """
    if not per_position:
        return None
    accepted = [p["accepted"] for p in per_position]
    trials = [per_position[0]["drafted"], *(min(a, p["drafted"]) for a, p in zip(accepted, per_position[1:]))]
    return _rate(sum(accepted), sum(trials))


# ----------------------------------------------------------------------- theory


def _check_theory_inputs(alpha: float, gamma: int) -> None:
    if not 0 <= alpha <= 1:
        raise MetricsError(f"alpha must be in [0, 1], got {alpha}")
    if int(gamma) != gamma or gamma < 1:
        raise MetricsError(f"gamma must be a positive integer, got {gamma}")


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[tokens per verify step] = (1 - alpha^(gamma+1)) / (1 - alpha) = sum of alpha^i, i=0..gamma.

    The sum form is exact at alpha = 1 (gamma + 1) and free of cancellation near it.
    """
    _check_theory_inputs(alpha, gamma)
    return float(sum(alpha**i for i in range(int(gamma) + 1)))


def draft_length_shares(per_position: Sequence[dict], steps: int) -> list[float]:
    """Share of decode steps that drafted 0, 1, .., k tokens, k the longest draft any step
    proposed, from the per-position counts (position i is drafted in every step that drafts
    at least i tokens)."""
    drafted = [p["drafted"] for p in per_position]
    while drafted and not drafted[-1]:
        drafted.pop()
    at_least = [steps, *drafted, 0]
    if steps <= 0 or any(a < b for a, b in zip(at_least, at_least[1:])):
        raise MetricsError(f"per-position drafted counts {drafted} do not fit {steps} decode steps")
    return [(a - b) / steps for a, b in zip(at_least, at_least[1:])]


def expected_tokens(alpha: float, shares: Sequence[float]) -> float:
    """Tokens a decode step yields on average, a step drafting k tokens yielding
    (1 - alpha^(k+1)) / (1 - alpha), weighted by the shares of steps drafting k = 0 .. K."""
    _check_theory_inputs(alpha, max(len(shares) - 1, 1))
    return sum(share * expected_tokens_per_step(alpha, k) if k else share for k, share in enumerate(shares))


def predicted_speedup(alpha: float, c: float, verify_cost: float, shares: Sequence[float]) -> float:
    """Leviathan et al.'s prediction (2023, Thm 3.8) over the draft lengths that happened.

    A step drafting k tokens yields (1 - alpha^(k+1)) / (1 - alpha) tokens on average and
    costs k c + 1 + (verify_cost - 1) k / K target forwards, K = len(shares) - 1 the longest
    draft proposed and verify_cost the measured cost of a (K+1)-token verification forward
    (linear in between). Expected tokens over expected cost, each weighted by the measured
    shares of steps drafting k = 0 .. K tokens. With every step drafting K tokens it is the
    paper's (1 - alpha^(K+1)) / ((1 - alpha) (K c + verify_cost))."""
    longest = len(shares) - 1
    if c < 0 or verify_cost <= 0:
        raise MetricsError(f"costs must be c >= 0 and verify_cost > 0, got {c} and {verify_cost}")
    cost = sum(share * (k * c + 1 + ((verify_cost - 1) * k / longest if longest else 0)) for k, share in enumerate(shares))
    return expected_tokens(alpha, shares) / cost


def theory(alpha: float, gamma: int, shares: Sequence[float]) -> dict:
    """The `theory` block of a result: what the cell alone says of the prediction, its
    alpha and the draft lengths that happened (`shares`, see draft_length_shares); `gamma`
    is the nominal one. The costs pair the cell with its AR cell (`specdec.theory`)."""
    _check_theory_inputs(alpha, gamma)
    return {"alpha": alpha, "gamma": gamma, "longest_draft": len(shares) - 1, "draft_length_shares": list(shares)}


# --------------------------------------------------------- confidence intervals


def _resampled_statistic(
    values: np.ndarray, statistic: Callable, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    indices = rng.integers(0, values.size, size=(n_resamples, values.size))
    return np.asarray(statistic(values[indices], axis=1), dtype=float)


def _check_ci_inputs(confidence: float, n_resamples: int, **samples: np.ndarray) -> None:
    if not 0 < confidence < 1:
        raise MetricsError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise MetricsError(f"n_resamples must be >= 1, got {n_resamples}")
    for name, sample in samples.items():
        if sample.size == 0:
            raise MetricsError(f"{name}: cannot bootstrap an empty sample")


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: Iterable[float],
    statistic: Callable = np.median,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of `statistic` (which takes `axis=`).

    Deterministic for a seed.
    """
    sample = _as_array(values)
    _check_ci_inputs(confidence, n_resamples, values=sample)
    rng = np.random.default_rng(seed)
    return _percentile_interval(_resampled_statistic(sample, statistic, n_resamples, rng), confidence)


def paired_ratio_ci(
    cell: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    ratio: Callable[[dict, dict], np.ndarray],
    estimate: float,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Confidence interval of a ratio of two cells that ran the same requests, by a paired
    bootstrap over requests: one draw resamples request indices and takes both cells' rows
    at them, so that a prompt that is slow for both cancels out. `cell` and `baseline` map a
    field to per-request arrays aligned by request; `ratio(cell, baseline)` takes arrays of
    shape (n_resamples, n) and returns one ratio per draw. The interval is `estimate` scaled
    by the bootstrap's spread around the full-sample ratio, so that it surrounds the point
    estimate the summary reports (a throughput ratio over the window, say) even where the
    per-request statistic differs slightly from it."""
    sizes = {len(v) for v in (*cell.values(), *baseline.values())}
    if len(sizes) != 1:
        raise MetricsError(f"paired samples must align request by request, got lengths {sorted(sizes)}")
    size = sizes.pop()
    _check_ci_inputs(confidence, n_resamples, requests=np.empty(size))
    full = ratio({k: v[None] for k, v in cell.items()}, {k: v[None] for k, v in baseline.items()})[0]
    indices = np.random.default_rng(seed).integers(0, size, size=(n_resamples, size))
    draws = ratio({k: v[indices] for k, v in cell.items()}, {k: v[indices] for k, v in baseline.items()})
    low, high = _percentile_interval(np.asarray(draws, dtype=float) / full, confidence)
    return estimate * low, estimate * high


def coefficient_of_variation(values: Iterable[float]) -> float | None:
    """Sample standard deviation (ddof=1) over the mean; None for fewer than 2 values."""
    sample = _as_array(values)
    if sample.size < 2:
        return None
    mean = sample.mean()
    if mean == 0:
        raise MetricsError("coefficient of variation is undefined for a zero mean")
    return float(sample.std(ddof=1) / abs(mean))


# ---------------------------------------------------------------- console table

_DIST_ROWS = (
    ("TTFT", "ttft_s", "ms", 1e3),
    ("TPOT", "tpot_s", "ms", 1e3),
    ("ITL (per emission)", "itl_s", "ms", 1e3),
    ("ITL (per token)", "itl_token_s", "ms", 1e3),
    ("E2E", "e2e_s", "s", 1.0),
    ("Queueing", "queue_s", "ms", 1e3),
    ("Request rate", "request_tok_s", "tok/s", 1.0),
)


def _cell(value: float | None, scale: float) -> str:
    return "-" if value is None else f"{value * scale:.2f}"


def summary_table(metrics: dict, title: str = "Summary") -> str:
    """The end-of-job console summary: totals, then one row per distribution."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "unit", "mean", "p50", "p90", "p99", "count"):
        table.add_column(column, justify="left" if column in ("metric", "unit") else "right")
    for label, key, unit, scale in _DIST_ROWS:
        dist = metrics.get(key)
        if dist is None:
            continue
        stats = [_cell(dist[k], scale) for k in ("mean", "p50", "p90", "p99")]
        table.add_row(label, unit, *stats, str(dist["count"]))
    totals = (
        f"{metrics['num_requests']} requests, {metrics['output_tokens']} output tokens in "
        f"{metrics['window_s']:.2f} s: {metrics['throughput_tok_s']:.2f} tok/s, "
        f"{metrics['throughput_req_s']:.3f} req/s"
    )
    buffer = StringIO()
    console = Console(file=buffer, width=100, color_system=None, force_terminal=False)
    console.print(table)
    console.print(totals)
    return buffer.getvalue()
