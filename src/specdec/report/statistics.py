"""Statistics over repeats and requests: percentile-bootstrap intervals (plain and paired by
request) and the coefficient of variation; deterministic for a seed."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from specdec.job.metrics import MetricsError, as_sample


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
    sample = as_sample(values)
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
    sample = as_sample(values)
    if sample.size < 2:
        return None
    mean = sample.mean()
    if mean == 0:
        raise MetricsError("coefficient of variation is undefined for a zero mean")
    return float(sample.std(ddof=1) / abs(mean))
