"""Per-cell statistics over the tidy runs table: medians over repeats with bootstrap
intervals, paired ratios to the AR baseline, and flags for repeats that disagree.

A cell here is a group of repeats (one `group_id`); its AR baseline is the group whose id is
`Cell.ar_counterpart().group_id` (column `ar_group_id` of the runs table, `specdec.aggregate`):
the same engine's AR. `speedup_vs_specdec_ar` divides by our engine's AR instead
(`specdec_ar_group_id`), so that engines compare on one scale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from specdec.metrics import bootstrap_ci, coefficient_of_variation

# Settings copied into a cell's summary row from its first run.
SETTING_COLUMNS = (
    "group_id",
    "experiment",
    "dataset",
    "target",
    "engine",
    "method",
    "drafter",
    "gamma",
    "batch_size",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "placement_strategy",
    "load",
    "load_mode",
    "load_rate",
)
# Per-cell statistics: tidy column -> display heading (latencies shown in ms).
SUMMARY_METRICS = {
    "throughput_tok_s": "tokens/s",
    "speedup": "speedup",
    "speedup_vs_specdec_ar": "speedup vs our AR",
    "predicted_speedup": "predicted speedup",
    "ttft_s_p50": "TTFT p50 (ms)",
    "ttft_s_p99": "TTFT p99 (ms)",
    "tpot_s_p50": "TPOT p50 (ms)",
    "tpot_s_p99": "TPOT p99 (ms)",
    "itl_s_p50": "ITL p50 (ms)",
    "itl_s_p99": "ITL p99 (ms)",
    "e2e_s_p50": "E2E p50 (ms)",
    "e2e_s_p99": "E2E p99 (ms)",
    "acceptance_rate": "acceptance",
    "mean_accepted_length": "mean accepted length",
    "mean_acceptance_length": "mean acceptance length (vLLM)",
    "energy_j_per_token": "energy (J/token)",
    "energy_ratio": "energy ratio",
}
# Ratios to an AR baseline: ratio column -> (the runs' column it divides, the column naming
# the baseline's group).
RATIOS = {
    "speedup": ("throughput_tok_s", "ar_group_id"),
    "speedup_vs_specdec_ar": ("throughput_tok_s", "specdec_ar_group_id"),
    "energy_ratio": ("energy_j_per_token", "ar_group_id"),
}
# Repeats are checked for agreement on these metrics.
STABILITY_METRICS = ("throughput_tok_s", "ttft_s_p50", "e2e_s_p50")
SUMMARY_COLUMNS = [
    *SETTING_COLUMNS,
    "cell",
    "method_label",
    "n_repeats",
    "repeats",
    *(f"{m}{suffix}" for m in SUMMARY_METRICS for suffix in ("", "_ci_low", "_ci_high")),
    "baseline",
    *(f"{m}_cv" for m in STABILITY_METRICS),
    "unstable",
    "n_failed",
    "near_ties",
    "defects",
    "flags",
]
NO_BASELINE = "no AR baseline"
DEFAULT_SETTINGS = {"cv_threshold": 0.1, "confidence": 0.95, "n_resamples": 10000, "seed": 0}


class SettingsError(ValueError):
    """An unknown or ill-typed key in a configuration section (`aggregate:`, `plots:`)."""


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


def summary_table(runs: pd.DataFrame, **settings: Any) -> pd.DataFrame:
    """One row per cell of the successful runs: medians, CIs, ratios to AR, stability flags."""
    settings = merge_settings(settings, DEFAULT_SETTINGS, "aggregate")
    ok = runs[runs["status"] == "ok"]
    failures = runs.loc[runs["status"] == "failed", "group_id"].value_counts()
    baselines = dict(list(ok[ok["method"] == "ar"].groupby("group_id")))
    rows = []
    for group_id, cell in ok.groupby("group_id", sort=False):
        row = _summarise_cell(cell, baselines, settings)
        row["n_failed"] = int(failures.get(group_id, 0))
        if row["n_failed"]:
            row["flags"] = "; ".join(filter(None, [row["flags"], f"{row['n_failed']} failed"]))
        _count_divergences(row, cell)
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _count_divergences(row: dict, cell: pd.DataFrame) -> None:
    """Greedy divergences of the cell's repeats, both checks together (missing where neither
    was checked); any defect flags the check that found it."""
    checks = ("correctness", "parity")
    for kind in ("near_ties", "defects"):
        counts = pd.concat([_numeric(cell, f"{check}_{kind}") for check in checks]).dropna()
        row[kind] = int(counts.sum()) if len(counts) else math.nan
    for check in checks:
        defects = int(_numeric(cell, f"{check}_defects").fillna(0).sum())
        if defects:
            row["flags"] = "; ".join(filter(None, [row["flags"], f"{check} failed: {defects} defect{'s' * (defects != 1)}"]))


def _paired_ratios(cell: pd.DataFrame, baseline: pd.DataFrame, column: str) -> np.ndarray:
    """Per-repeat ratios cell/baseline; a repeat without a partner uses the baseline median."""
    base = baseline.dropna(subset=[column]).set_index("repeat")[column]
    if base.empty:
        return np.array([])
    ratios = [
        value / base.get(repeat, base.median())
        for repeat, value in zip(cell["repeat"], cell[column])
        if not pd.isna(value)
    ]
    return np.asarray(ratios, dtype=float)


def _summarise_cell(cell: pd.DataFrame, baselines: dict[str, pd.DataFrame], settings: dict) -> dict:
    first = cell.iloc[0]
    baseline = baselines.get(first["ar_group_id"])
    row: dict[str, Any] = {key: first[key] for key in SETTING_COLUMNS}
    row.update(
        cell=first["cell_name"],
        method_label=first["method_label"],
        n_repeats=len(cell),
        repeats=", ".join(map(str, sorted(cell["repeat"]))),
    )
    ci_settings = {k: settings[k] for k in ("confidence", "n_resamples", "seed")}
    for metric in SUMMARY_METRICS:
        if metric in RATIOS:
            column, baseline_key = RATIOS[metric]
            base = baselines.get(first[baseline_key])
            values = _paired_ratios(cell, base, column) if base is not None else []
        else:
            values = _numeric(cell, metric).dropna().to_numpy()
        low, high = bootstrap_ci(values, np.median, **ci_settings) if len(values) else (math.nan, math.nan)
        row[metric] = float(np.median(values)) if len(values) else math.nan
        row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = low, high
    row["baseline"] = NO_BASELINE if baseline is None else baseline["cell_name"].iloc[0]
    unstable = []
    for metric in STABILITY_METRICS:
        cv = coefficient_of_variation(_numeric(cell, metric).dropna())
        row[f"{metric}_cv"] = math.nan if cv is None else cv
        if cv is not None and cv > settings["cv_threshold"]:
            unstable.append(f"{metric} cv={cv:.2f}")
    row["unstable"] = bool(unstable)
    row["flags"] = "; ".join(unstable)
    return row


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats; all missing when no run reported it."""
    if column not in frame:
        return pd.Series(math.nan, index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")
