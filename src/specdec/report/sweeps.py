"""Where speculation stops paying: the summary's cells that differ along one axis (batch
size, request rate) as series, the break-even point of each series' speedup along it, and
the highest request rate each method serves within its SLOs.

Break-even is the axis value where speedup falls through 1.0: between the largest measured
point that still pays (speedup >= 1) and the point after it, interpolated linearly (in
log2 for batch size, whose sweeps are geometric). Its interval takes the same crossing of
the speedup's CI bounds: below the low bound's crossing the speedup is surely above 1, beyond
the high bound's it is surely below. A series that pays at every point breaks even beyond
the largest measured (`> x`); one that pays at none, below the smallest (`< x`).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pandas as pd

from specdec.report import columns as col
from specdec.report.summary import SETTING_COLUMNS, answer_metric

# axis -> (the summary's columns that make the axis, the speedup that is read along it).
# Under a closed load speedup is throughput's; along request rate, where an open load's
# throughput is the offered rate for every method, it is end-to-end latency's.
AXES = {
    col.BATCH_SIZE: ((col.BATCH_SIZE,), None),
    col.LOAD_RATE: ((col.LOAD, col.LOAD_RATE), col.LATENCY_SPEEDUP),
}
BREAK_EVEN_COLUMNS = (
    col.EXPERIMENT, col.DATASET, col.ENGINE, col.METHOD_LABEL, col.GAMMA, col.SERIES, col.AXIS, "metric",
    "points", col.BREAK_EVEN, "break_even_value", "break_even_low", "break_even_high",
)
CAPACITY_COLUMNS = (col.EXPERIMENT, col.DATASET, col.ENGINE, col.METHOD_LABEL, col.GAMMA, col.SERIES, "points", "capacity", "capacity_req_s")


def series(summary: pd.DataFrame, axis: str, drafting_only: bool = True) -> Iterator[tuple[str, pd.DataFrame]]:
    """(label, rows sorted along `axis`) for every set of cells that differ only along
    `axis` and measure at least two points of it; the label names the settings they share
    that vary across the experiment's series."""
    columns = AXES[axis][0]
    frame = summary if axis == col.BATCH_SIZE else summary[summary[col.LOAD_MODE] == "open"]
    if drafting_only:
        frame = frame[frame[col.METHOD] != "ar"]
    keys = [c for c in SETTING_COLUMNS if c not in (col.GROUP_ID, *columns)]
    varying = [c for c in keys if c not in (col.EXPERIMENT, col.METHOD, col.DRAFTER) and frame[c].nunique(dropna=False) > 1]
    for _, rows in frame.groupby(keys, dropna=False, sort=False):
        if rows[axis].nunique() < 2:
            continue
        first = rows.iloc[0]
        label = ", ".join([first[col.METHOD_LABEL], *(f"{c}={first[c]}" for c in varying if c != col.METHOD_LABEL)])
        yield label, rows.sort_values(axis)


def axis_metric(axis: str, rows: pd.DataFrame) -> str:
    """The speedup read along `axis` for one series (see `AXES`)."""
    return AXES[axis][1] or answer_metric(rows[col.LOAD_MODE].iloc[0])


def crossing(xs, ys, log_x: bool = False) -> tuple[str, float]:
    """Where `ys` falls through 1.0 along `xs` (see the module's docstring): its text and
    value (nan outside the measured range)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    paying = np.flatnonzero(ys >= 1.0)
    if not len(paying):
        return f"< {xs[0]:g}", math.nan
    last = paying[-1]
    if last == len(xs) - 1:
        return f"> {xs[-1]:g}", math.nan
    scale = np.log2 if log_x else (lambda v: v)
    x0, x1 = scale(xs[last]), scale(xs[last + 1])
    fraction = (ys[last] - 1.0) / (ys[last] - ys[last + 1])
    value = x0 + fraction * (x1 - x0)
    value = float(2**value if log_x else value)
    return f"{value:.3g}", value


def _points(rows: pd.DataFrame, axis: str, metric: str) -> str:
    return "; ".join(
        f"{x:g}: {v:.2f} [{lo:.2f}, {hi:.2f}]"
        for x, v, lo, hi in zip(rows[axis], rows[metric], rows[f"{metric}_ci_low"], rows[f"{metric}_ci_high"])
    )


def break_even_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per series and axis: the speedup with its CI at each point and the break-even."""
    table = []
    for axis in AXES:
        for label, rows in series(summary, axis):
            metric = axis_metric(axis, rows)
            rows = rows.dropna(subset=[metric])
            if len(rows) < 2:
                continue
            log_x = axis == col.BATCH_SIZE
            text, value = crossing(rows[axis], rows[metric], log_x)
            # the CI's low bound crosses first: up to it the speedup is surely above 1
            low_text, low = crossing(rows[axis], rows[f"{metric}_ci_low"], log_x)
            high_text, high = crossing(rows[axis], rows[f"{metric}_ci_high"], log_x)
            first = rows.iloc[0]
            table.append({
                **{c: first[c] for c in (col.EXPERIMENT, col.DATASET, col.ENGINE, col.METHOD_LABEL, col.GAMMA)},
                col.SERIES: label, col.AXIS: axis, "metric": metric, "points": _points(rows, axis, metric),
                col.BREAK_EVEN: f"{text} (CI {low_text} to {high_text})",
                "break_even_value": value, "break_even_low": low, "break_even_high": high,
            })
    return pd.DataFrame(table, columns=BREAK_EVEN_COLUMNS)


def capacity(rates, goodputs, within: float = 0.05) -> tuple[str, float]:
    """The highest offered rate whose goodput stays within `within` of it, as text and value
    (`< smallest` when none does; `>= largest` when the largest does: beyond it is unknown)."""
    rates, goodputs = np.asarray(rates, dtype=float), np.asarray(goodputs, dtype=float)
    served = np.flatnonzero(goodputs >= (1 - within) * rates)
    if not len(served):
        return f"< {rates[0]:g}", math.nan
    best = rates[served[-1]]
    return (f">= {best:g}" if served[-1] == len(rates) - 1 else f"{best:g}"), float(best)


def capacity_table(summary: pd.DataFrame, within: float = 0.05) -> pd.DataFrame:
    """Per rate sweep, AR and each method side by side: goodput at each offered rate and the
    highest rate served within the SLOs (empty without SLOs or rate sweeps)."""
    if summary.empty or summary[col.GOODPUT_REQ_S].isna().all():
        return pd.DataFrame(columns=CAPACITY_COLUMNS)
    table = []
    for label, rows in series(summary, col.LOAD_RATE, drafting_only=False):
        rows = rows.dropna(subset=[col.GOODPUT_REQ_S])
        if len(rows) < 2:
            continue
        text, value = capacity(rows[col.LOAD_RATE], rows[col.GOODPUT_REQ_S], within)
        first = rows.iloc[0]
        table.append({
            **{c: first[c] for c in (col.EXPERIMENT, col.DATASET, col.ENGINE, col.METHOD_LABEL, col.GAMMA)},
            col.SERIES: label,
            "points": "; ".join(f"{r:g}/s: {g:.2f}/s ({m:.0%} met)" for r, g, m in zip(rows[col.LOAD_RATE], rows[col.GOODPUT_REQ_S], rows[col.SLO_MET])),
            "capacity": f"{text} req/s", "capacity_req_s": value,
        })
    return pd.DataFrame(table, columns=CAPACITY_COLUMNS)
