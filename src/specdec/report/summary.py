"""Per-cell statistics over the tidy runs table: medians over repeats with bootstrap
intervals, paired ratios to the AR baseline, and flags for repeats that disagree.

A cell here is a group of repeats (one `group_id`); its AR baseline is the group whose id is
`Cell.ar_counterpart().group_id` (column `ar_group_id` of the runs table, `specdec.report.aggregate`):
the same engine's AR, or for an interleaved cell the AR its own job decoded request by request
(`aggregate.interleaved_tables`; column `reference`). `speedup_vs_specdec_ar` divides by our engine's AR instead
(`specdec_ar_group_id`), so that engines compare on one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from specdec.report import columns as col
from specdec.report.statistics import bootstrap_ci, coefficient_of_variation, paired_ratio_ci

# Settings copied into a cell's summary row from its first run.
SETTING_COLUMNS = (
    col.GROUP_ID,
    col.EXPERIMENT,
    col.DATASET,
    col.TARGET,
    col.ENGINE,
    col.METHOD,
    col.DRAFTER,
    col.GAMMA,
    col.BATCH_SIZE,
    col.MAX_NEW_TOKENS,
    col.TEMPERATURE,
    "top_k",
    "top_p",
    col.PLACEMENT_STRATEGY,
    col.LOAD,
    col.LOAD_MODE,
    col.LOAD_ARRIVAL,
    col.LOAD_RATE,
)
# Per-cell statistics: tidy column -> display heading (latencies shown in ms).
SUMMARY_METRICS = {
    col.THROUGHPUT_TOK_S: "tokens/s",
    col.SPEEDUP: "speedup",
    col.SPEEDUP_VS_SPECDEC_AR: "speedup vs our AR",
    col.LATENCY_SPEEDUP: "E2E speedup",
    col.PREDICTED_SPEEDUP: "predicted speedup",
    col.THEORY_COST_RATIO: "cost ratio c",  # drafter / target one-token forward: why a method pays or not
    col.NODES_PER_DRAFT: "nodes per draft",  # a tree's verification: N nodes, N + 1 wide
    col.VERIFY_COST_RATIO: "verify cost v",  # that verification over AR's one-token forward
    col.PREDICTED_TAU: "predicted τ",  # beside mean acceptance length, its measurement
    # Energy beside the speedup: what the speedup cost, or saved.
    col.ENERGY_J_PER_TOKEN: "energy (J/token)",
    col.ENERGY_J_PER_ACCEPTED_TOKEN: "energy (J/accepted draft token)",
    "energy_ratio": "energy ratio",
    "ttft_s_p50": "TTFT p50 (ms)",
    "ttft_s_p99": "TTFT p99 (ms)",
    "tpot_s_p50": "TPOT p50 (ms)",
    "tpot_s_p99": "TPOT p99 (ms)",
    "itl_s_p50": "ITL p50 (ms)",
    "itl_s_p99": "ITL p99 (ms)",
    "e2e_s_p50": "E2E p50 (ms)",
    "e2e_s_p99": "E2E p99 (ms)",
    col.ACCEPTANCE_RATE: "acceptance",
    col.MEAN_ACCEPTED_LENGTH: "mean accepted length",
    col.MEAN_ACCEPTANCE_LENGTH: "mean acceptance length (vLLM)",
    col.GOODPUT_REQ_S: "goodput (req/s)",
    col.SLO_MET: "meeting SLOs",
    "slo_ttft_met": "meeting TTFT SLO",
    "slo_tpot_met": "meeting TPOT SLO",
    "slo_e2e_met": "meeting E2E SLO",
}


@dataclass(frozen=True)
class Ratio:
    """A ratio of a cell to an AR baseline, paired by repeat: `column` of the runs table,
    the baseline's group named by the runs' `baseline` column, cell / baseline or (a
    latency, `inverse`) baseline / cell; `per_request`, the same ratio over per-request
    arrays (`REQUEST_FIELDS` -> shape (draws, requests)), gives its interval from a paired
    bootstrap over requests when fewer than two repeats pair."""

    column: str
    baseline: str
    inverse: bool = False
    per_request: Callable[[dict, dict], np.ndarray] | None = None


def _token_rate(requests: dict) -> np.ndarray:
    # Tokens over the summed request times: the window's throughput for one request at a
    # time, and a faithful stand-in under batching, where both cells' times sum over rows.
    return requests[col.OUTPUT_TOKENS].sum(-1) / requests[col.E2E_S].sum(-1)


def _throughput_ratio(cell: dict, baseline: dict) -> np.ndarray:
    return _token_rate(cell) / _token_rate(baseline)


# A replay drafter's cell: its speedup measures the engine at a set alpha, not a method.
MEASUREMENT_TOOL_FLAG = "measurement tool (replay drafter), not a method result"
REQUEST_FIELDS = (col.OUTPUT_TOKENS, col.E2E_S)
RATIOS = {
    col.SPEEDUP: Ratio(col.THROUGHPUT_TOK_S, col.AR_GROUP_ID, per_request=_throughput_ratio),
    col.SPEEDUP_VS_SPECDEC_AR: Ratio(col.THROUGHPUT_TOK_S, col.SPECDEC_AR_GROUP_ID, per_request=_throughput_ratio),
    col.LATENCY_SPEEDUP: Ratio("e2e_s_mean", col.AR_GROUP_ID, inverse=True, per_request=lambda c, b: b[col.E2E_S].mean(-1) / c[col.E2E_S].mean(-1)),
    "energy_ratio": Ratio(col.ENERGY_J_PER_TOKEN, col.AR_GROUP_ID),
}
# Repeats are checked for agreement on these metrics.
STABILITY_METRICS = (col.THROUGHPUT_TOK_S, "ttft_s_p50", "e2e_s_p50")
SUMMARY_COLUMNS = [
    *SETTING_COLUMNS,
    col.CELL,
    col.METHOD_LABEL,
    col.N_REPEATS,
    "repeats",
    *(f"{m}{suffix}" for m in SUMMARY_METRICS for suffix in ("", "_ci_low", "_ci_high")),
    col.BASELINE,
    col.REFERENCE,
    *(f"{m}_cv" for m in STABILITY_METRICS),
    "unstable",
    "outside_load",
    "n_failed",
    col.NEAR_TIES,
    col.DEFECTS,
    col.FLAGS,
]
NO_BASELINE = "no AR baseline"
# Where a drafting cell's ratios to AR come from (column `reference`; AR rows have none).
REFERENCE_LABELS = {"separate": "separate cell", "interleaved": "interleaved"}
DEFAULT_SETTINGS = {"cv_threshold": 0.1, "confidence": 0.95, "n_resamples": 10000, "seed": 0}


class SettingsError(ValueError):
    """An unknown or ill-typed key in a configuration section (`aggregate:`, `plots:`)."""


def answer_metric(load_mode: str) -> str:
    """The speedup that answers for a cell: throughput's under a closed load, end-to-end
    latency's under an open one, where every method's throughput is the offered rate."""
    return col.SPEEDUP if load_mode == "closed" else col.LATENCY_SPEEDUP


def merge_settings(given: dict | None, defaults: dict, section: str) -> dict:
    """`defaults` updated with `given`; an unknown key is an error naming the config section."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise SettingsError(f"{section}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    for key, value in given.items():
        expected = type(defaults[key])
        if not isinstance(value, expected) and not (expected is float and isinstance(value, int)):
            raise SettingsError(f"{section}.{key}: expected {expected.__name__}, got {value!r}")
    return {**defaults, **given}


def _baselines(ok: pd.DataFrame, requests: pd.DataFrame | None,
               interleaved: tuple[pd.DataFrame, pd.DataFrame] | None) -> tuple[dict, dict]:
    """AR runs by group id and request rows by run, the interleaved references' included."""
    ar = ok[ok[col.METHOD] == "ar"]
    if interleaved is not None and len(interleaved[0]):
        ar = pd.concat([ar, interleaved[0]], ignore_index=True)
        requests = interleaved[1] if requests is None else pd.concat([requests, interleaved[1]], ignore_index=True)
    return dict(list(ar.groupby(col.GROUP_ID))), {} if requests is None else dict(list(requests.groupby(col.CELL)))


def summary_table(runs: pd.DataFrame, requests: pd.DataFrame | None = None,
                  interleaved: tuple[pd.DataFrame, pd.DataFrame] | None = None, **settings: Any) -> pd.DataFrame:
    """One row per cell of the successful runs: medians, CIs, ratios to AR, stability flags.
    `requests` (aggregate.request_tables: one row per measured request, `cell` naming its
    run) gives ratios an interval even with one repeat (`Ratio.per_request`). `interleaved`
    (aggregate.interleaved_tables) holds the AR references of interleaved cells and their
    requests: those cells' baselines."""
    settings = merge_settings(settings, DEFAULT_SETTINGS, "aggregate")
    ok = runs[runs[col.STATUS] == "ok"]
    failures = runs.loc[runs[col.STATUS] == "failed", col.GROUP_ID].value_counts()
    baselines, per_run = _baselines(ok, requests, interleaved)
    rows = []
    for group_id, cell in ok.groupby(col.GROUP_ID, sort=False):
        row = _summarise_cell(cell, baselines, per_run, settings)
        row["n_failed"] = int(failures.get(group_id, 0))
        if row["n_failed"]:
            row[col.FLAGS] = "; ".join(filter(None, [row[col.FLAGS], f"{row['n_failed']} failed"]))
        _count_divergences(row, cell)
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _count_divergences(row: dict, cell: pd.DataFrame) -> None:
    """Greedy divergences of the cell's repeats, both checks together (missing where neither
    was checked); any defect flags the check that found it."""
    checks = ("correctness", "parity")
    for kind in (col.NEAR_TIES, col.DEFECTS):
        counts = pd.concat([_numeric(cell, f"{check}_{kind}") for check in checks]).dropna()
        row[kind] = int(counts.sum()) if len(counts) else math.nan
    for check in checks:
        defects = int(_numeric(cell, f"{check}_defects").fillna(0).sum())
        if defects:
            row[col.FLAGS] = "; ".join(filter(None, [row[col.FLAGS], f"{check} failed: {defects} defect{'s' * (defects != 1)}"]))


def _paired_ratios(cell: pd.DataFrame, baseline: pd.DataFrame, ratio: Ratio) -> np.ndarray:
    """Per-repeat ratios to the baseline; a repeat without a partner uses the baseline median."""
    base = baseline.dropna(subset=[ratio.column]).set_index(col.REPEAT)[ratio.column]
    if base.empty:
        return np.array([])
    pairs = [(value, base.get(repeat, base.median())) for repeat, value in zip(cell[col.REPEAT], cell[ratio.column]) if not pd.isna(value)]
    return np.asarray([b / v if ratio.inverse else v / b for v, b in pairs], dtype=float)


def _paired_requests(cell: pd.DataFrame, baseline: pd.DataFrame, per_run: dict[str, pd.DataFrame]) -> tuple[dict, dict] | None:
    """Per-request arrays of the cell's first repeat and the baseline's run of that repeat
    (else its first), aligned by request id; None when they share no request."""
    first = cell.iloc[0]
    partner = baseline[baseline[col.REPEAT] == first[col.REPEAT]]
    partner = (partner if len(partner) else baseline).iloc[0]
    ours, theirs = per_run.get(first[col.CELL]), per_run.get(partner[col.CELL])
    if ours is None or theirs is None:
        return None
    paired = ours.merge(theirs, on=col.REQUEST_ID, suffixes=("", "_base")).dropna(subset=[*REQUEST_FIELDS, *(f"{f}_base" for f in REQUEST_FIELDS)])
    if paired.empty:
        return None
    return ({f: paired[f].to_numpy(float) for f in REQUEST_FIELDS}, {f: paired[f"{f}_base"].to_numpy(float) for f in REQUEST_FIELDS})


def _ratio_estimate(cell, baselines, per_run, metric: str, ci: dict) -> tuple[float, float, float]:
    """Median of the per-repeat ratios and its interval: over repeats when two or more pair,
    else over the requests of the one pair."""
    ratio = RATIOS[metric]
    base = baselines.get(cell.iloc[0][ratio.baseline])
    values = _paired_ratios(cell, base, ratio) if base is not None else np.array([])
    if not len(values):
        return math.nan, math.nan, math.nan
    estimate = float(np.median(values))
    paired_repeats = len(set(cell[col.REPEAT]) & set(base[col.REPEAT]))
    arrays = _paired_requests(cell, base, per_run) if ratio.per_request and paired_repeats < 2 else None
    if arrays is not None:
        return estimate, *paired_ratio_ci(*arrays, ratio.per_request, estimate, **ci)
    return estimate, *bootstrap_ci(values, np.median, **ci)


def _summarise_cell(cell: pd.DataFrame, baselines: dict[str, pd.DataFrame], per_run: dict[str, pd.DataFrame], settings: dict) -> dict:
    first = cell.iloc[0]
    baseline = baselines.get(first[col.AR_GROUP_ID])
    row: dict[str, Any] = {key: first[key] for key in SETTING_COLUMNS}
    row.update(
        cell=first[col.CELL_NAME],
        method_label=first[col.METHOD_LABEL],
        n_repeats=len(cell),
        repeats=", ".join(map(str, sorted(cell[col.REPEAT]))),
    )
    ci = {k: settings[k] for k in ("confidence", "n_resamples", "seed")}
    for metric in SUMMARY_METRICS:
        if metric in RATIOS:
            estimate, low, high = _ratio_estimate(cell, baselines, per_run, metric, ci)
        else:
            values = _numeric(cell, metric).dropna().to_numpy()
            estimate = float(np.median(values)) if len(values) else math.nan
            low, high = bootstrap_ci(values, np.median, **ci) if len(values) else (math.nan, math.nan)
        row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = estimate, low, high
    row[col.BASELINE] = NO_BASELINE if baseline is None else baseline[col.CELL_NAME].iloc[0]
    row[col.REFERENCE] = None if first[col.METHOD] == "ar" else REFERENCE_LABELS[first.get(col.REFERENCE, "separate")]
    unstable = []
    for metric in STABILITY_METRICS:
        cv = coefficient_of_variation(_numeric(cell, metric).dropna())
        row[f"{metric}_cv"] = math.nan if cv is None else cv
        if cv is not None and cv > settings["cv_threshold"]:
            unstable.append(f"{metric} cv={cv:.2f}")
    row["unstable"] = bool(unstable)
    # A repeat measured beside other work: its numbers are partly its neighbours'.
    outside = [f"r{r} {flag}" for r, flag in zip(cell[col.REPEAT], cell.get(col.COTENANT_FLAG, [])) if isinstance(flag, str)]
    row["outside_load"] = bool(outside)
    tool = [MEASUREMENT_TOOL_FLAG] if first.get(col.MEASUREMENT_TOOL) else []
    row[col.FLAGS] = "; ".join(tool + unstable + outside)
    return row


CATEGORY_COLUMNS = [
    col.CELL,
    col.METHOD_LABEL,
    col.DATASET,
    col.GAMMA,
    col.BATCH_SIZE,
    col.LOAD,
    col.CATEGORY,
    col.N_REPEATS,
    col.N_REQUESTS,
    col.SPEEDUP,
    col.SPEEDUP_REQUESTS,
    col.BASELINE,
    col.ACCEPTANCE_RATE,
    col.MEAN_ACCEPTED_LENGTH,
    col.DRAFTED_TOKENS,
    col.ACCEPTED_TOKENS,
]


def category_table(runs: pd.DataFrame, requests: pd.DataFrame,
                   interleaved: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Per drafting cell and prompt category, repeats pooled: the speedup over AR from each
    request paired with the AR cell's same request (`RATIOS["speedup"].per_request` on the
    category's pairs; the AR run of the same repeat, else its first), acceptance rate
    (accepted / drafted) and mean accepted length (output tokens per target forward), with
    the requests behind each (`n_requests`, and `speedup_requests` pairs). An interleaved
    cell pairs with its own AR (`interleaved`, as in `summary_table`)."""
    ok = runs[runs[col.STATUS] == "ok"]
    baselines, by_run = _baselines(ok, requests, interleaved)
    rows = []
    for _, cell in ok[ok[col.METHOD] != "ar"].groupby(col.GROUP_ID, sort=False):
        first = cell.iloc[0]
        baseline = baselines.get(first[col.AR_GROUP_ID])
        own = pd.concat([by_run[run] for run in cell[col.CELL] if run in by_run])
        pairs = pd.concat([_category_pairs(run, baseline, by_run) for run in cell.itertuples()]) if baseline is not None else None
        for category, group in own.groupby(col.CATEGORY, sort=True):
            paired = None if pairs is None else pairs[pairs[col.CATEGORY] == category]
            counts = {key: float(pd.to_numeric(group[key]).sum()) for key in (col.DRAFTED_TOKENS, col.ACCEPTED_TOKENS, col.TARGET_FORWARDS, col.OUTPUT_TOKENS)}
            rows.append(
                {
                    col.CELL: first[col.CELL_NAME],
                    **{key: first[key] for key in (col.METHOD_LABEL, col.DATASET, col.GAMMA, col.BATCH_SIZE, col.LOAD)},
                    col.CATEGORY: category,
                    col.N_REPEATS: len(cell),
                    col.N_REQUESTS: len(group),
                    col.SPEEDUP: _pooled_speedup(paired),
                    col.SPEEDUP_REQUESTS: 0 if paired is None else len(paired),
                    col.BASELINE: NO_BASELINE if baseline is None else baseline[col.CELL_NAME].iloc[0],
                    col.ACCEPTANCE_RATE: counts[col.ACCEPTED_TOKENS] / counts[col.DRAFTED_TOKENS] if counts[col.DRAFTED_TOKENS] else math.nan,
                    col.MEAN_ACCEPTED_LENGTH: counts[col.OUTPUT_TOKENS] / counts[col.TARGET_FORWARDS] if counts[col.TARGET_FORWARDS] else math.nan,
                    col.DRAFTED_TOKENS: counts[col.DRAFTED_TOKENS],
                    col.ACCEPTED_TOKENS: counts[col.ACCEPTED_TOKENS],
                }
            )
    return pd.DataFrame(rows, columns=CATEGORY_COLUMNS)


def _category_pairs(run: Any, baseline: pd.DataFrame, by_run: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One run's requests beside the same requests of its AR partner run (`_base` columns)."""
    partner = baseline[baseline[col.REPEAT] == run.repeat]
    partner = (partner if len(partner) else baseline).iloc[0]
    ours, theirs = by_run.get(run.cell), by_run.get(partner[col.CELL])
    if ours is None or theirs is None:
        return pd.DataFrame(columns=[col.CATEGORY, *REQUEST_FIELDS, *(f"{f}_base" for f in REQUEST_FIELDS)])
    paired = ours.merge(theirs[[col.REQUEST_ID, *REQUEST_FIELDS]], on=col.REQUEST_ID, suffixes=("", "_base"))
    return paired.dropna(subset=[*REQUEST_FIELDS, *(f"{f}_base" for f in REQUEST_FIELDS)])


def _pooled_speedup(pairs: pd.DataFrame | None) -> float:
    if pairs is None or pairs.empty:
        return math.nan
    arrays = [{f: pairs[f"{f}{suffix}"].to_numpy(float) for f in REQUEST_FIELDS} for suffix in ("", "_base")]
    return float(RATIOS[col.SPEEDUP].per_request(*arrays))


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats; all missing when no run reported it."""
    if column not in frame:
        return pd.Series(math.nan, index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")
