"""Latency and throughput of request records: the per-request values and the result's
`metrics` block, defined once for the whole project.

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

Distributions (`DIST`) hold mean, p50, p90, p99 (numpy linear-interpolation percentiles) and
the count of values; the statistics are null when the count is 0. Acceptance is
`specdec.job.acceptance`'s, the theory's formulas `specdec.job.leviathan`'s, intervals over repeats
`specdec.report.statistics`'.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


class MetricsError(ValueError):
    """Records or parameters that cannot yield a metric; the message names the field."""


# ---------------------------------------------------------------- distributions


def as_sample(values: Iterable[float], name: str = "values") -> np.ndarray:
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
    array = as_sample(values)
    return float(np.percentile(array, q)) if array.size else None


def distribution(values: Iterable[float], name: str = "values") -> dict:
    """DIST: {"mean", "p50", "p90", "p99", "count"}; statistics null when empty."""
    array = as_sample(values, name)
    dist = {"mean": float(array.mean()) if array.size else None}
    for q in PERCENTILES:
        dist[f"p{q}"] = percentile(array, q)
    dist["count"] = int(array.size)
    return dist


# ------------------------------------------------------------ per-request values


def measured(records: Iterable[dict]) -> list[dict]:
    """The records that count: everything but warm-up requests."""
    return [record for record in records if not record.get("warmup", False)]


def record_field(record: dict, key: str):
    try:
        return record[key]
    except KeyError:
        raise MetricsError(
            f"request {record.get('request_id', '?')!r}: missing field {key!r}"
        ) from None


def ttft(record: dict) -> float:
    return record_field(record, "first_token_s") - record_field(record, "arrival_s")


def e2e(record: dict) -> float:
    return record_field(record, "finish_s") - record_field(record, "arrival_s")


def queueing_delay(record: dict) -> float:
    return record_field(record, "start_s") - record_field(record, "arrival_s")


def tpot(record: dict) -> float | None:
    """Time per output token after the first; None for outputs of one token or fewer."""
    tokens = record_field(record, "output_tokens")
    if tokens < 2:
        return None
    return (e2e(record) - ttft(record)) / (tokens - 1)


def request_tokens_per_s(record: dict) -> float | None:
    service = record_field(record, "finish_s") - record_field(record, "start_s")
    return record_field(record, "output_tokens") / service if service > 0 else None


def emission_gaps(record: dict) -> list[float]:
    """One gap per emission after the first, however many tokens it carried."""
    times = [time for time, _ in record_field(record, "emissions")]
    return [later - earlier for earlier, later in zip(times, times[1:])]


def token_gaps(record: dict) -> list[float]:
    """Per-token ITL: each emission's gap split evenly over the tokens it carried."""
    emissions = record_field(record, "emissions")
    gaps = []
    for (earlier, _), (later, count) in zip(emissions, emissions[1:]):
        gaps.extend([(later - earlier) / count] * count)
    return gaps


# -------------------------------------------------------------------- summaries


def service_time(rows: Sequence[dict]) -> float:
    """Seconds during which any of `rows` was in service: the union of their start..finish
    intervals (a batch's rows overlap; gaps between batches do not count)."""
    total, reach = 0.0, -math.inf
    for start, finish in sorted((record_field(r, "start_s"), record_field(r, "finish_s")) for r in rows):
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
        window_s = max(record_field(r, "finish_s") for r in rows) - min(record_field(r, "arrival_s") for r in rows)
    if window_s <= 0:
        raise MetricsError(f"measured window is {window_s} s; finish must follow arrival")
    output_tokens = sum(record_field(r, "output_tokens") for r in rows)
    tpots = [value for value in map(tpot, rows) if value is not None]
    rates = [value for value in map(request_tokens_per_s, rows) if value is not None]
    return {
        "num_requests": len(rows),
        "output_tokens": output_tokens,
        "prompt_tokens": sum(record_field(r, "prompt_tokens") for r in rows),
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
