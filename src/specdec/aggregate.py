"""Tables from benchmark result files: one tidy row per run, per-cell summaries, failures.

Reads only `result.json` files (docs/contracts.md); never loads a model. A *cell* is a
configuration without its repeat index; its repeats are summarised by the median with a
bootstrap confidence interval, and speculative cells are compared with the AR cell that
shares every setting except the decoding method.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from specdec.io import atomic_open
from specdec.metrics import bootstrap_ci, coefficient_of_variation

DIST_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s", "request_tok_s")
DIST_FIELDS = ("mean", "p50", "p90", "p99", "count")
LOAD_FIELDS = ("mode", "rate", "arrival", "burstiness", "num_requests", "num_prompts", "duration_s")
# Configuration keys copied into the tidy table as they are.
CONFIG_KEYS = (
    "experiment",
    "cell",
    "dataset",
    "target",
    "method",
    "drafter",
    "gamma",
    "batch_size",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repeat",
    "seed",
    "warmup",
)
# Everything that makes a cell what it is, except the repeat (and its seed).
CELL_KEYS = (
    *(k for k in CONFIG_KEYS if k not in ("cell", "repeat", "seed", "warmup")),
    "placement_strategy",
    "load",
)
# The AR baseline of a cell differs from it only in the decoding method.
AR_MATCH_KEYS = tuple(k for k in CELL_KEYS if k not in ("method", "drafter", "gamma"))
# Per-cell statistics: tidy column -> display heading (latencies shown in ms).
SUMMARY_METRICS = {
    "throughput_tok_s": "tokens/s",
    "speedup": "speedup",
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
    "energy_j_per_token": "energy (J/token)",
    "energy_ratio": "energy ratio",
}
RATIOS = {"speedup": "throughput_tok_s", "energy_ratio": "energy_j_per_token"}
# Repeats are checked for agreement on these metrics.
STABILITY_METRICS = ("throughput_tok_s", "ttft_s_p50", "e2e_s_p50")
SUMMARY_COLUMNS = [
    *CELL_KEYS,
    "load_mode",
    "load_rate",
    "cell",
    "method_label",
    "n_repeats",
    "repeats",
    *(f"{m}{suffix}" for m in SUMMARY_METRICS for suffix in ("", "_ci_low", "_ci_high")),
    "baseline",
    *(f"{m}_cv" for m in STABILITY_METRICS),
    "unstable",
    "n_failed",
    "flags",
]
NO_BASELINE = "no AR baseline"
DASH = "–"
DEFAULT_SETTINGS = {"cv_threshold": 0.1, "confidence": 0.95, "n_resamples": 10000, "seed": 0}


class ResultFileError(ValueError):
    """A result file that cannot be read as the contract describes."""


class SettingsError(ValueError):
    """An unknown or ill-typed key in a configuration section (`aggregate:`, `plots:`)."""


# --- reading -------------------------------------------------------------------------------


def load_result(path: str | Path) -> dict:
    """One result.json, checked for the keys aggregation relies on."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResultFileError(f"{path}: cannot read result JSON: {err}") from err
    if not isinstance(result, dict):
        raise ResultFileError(f"{path}: a result must be a JSON object")
    for key in ("status", "config", "metrics"):
        if key not in result:
            raise ResultFileError(f"{path}: missing key {key!r}")
    for key in ("experiment", "cell", "method", "repeat"):
        if key not in result["config"]:
            raise ResultFileError(f"{path}: missing key 'config.{key}'")
    if result["status"] not in ("ok", "failed", "interrupted"):
        raise ResultFileError(f"{path}: unknown status {result['status']!r}")
    return result


def flatten_result(result: dict, path: str | Path = "") -> dict[str, Any]:
    """One tidy row: config keys, DIST fields as `{metric}_{field}`, acceptance, energy, memory..."""
    config, metrics = result["config"], result.get("metrics") or {}
    row: dict[str, Any] = {"path": str(path), "status": result["status"]}
    for key in CONFIG_KEYS:
        row[key] = config.get(key)
    row["placement_strategy"] = (config.get("placement") or {}).get("strategy")
    load = config.get("load") or {}
    row["load"] = load_label(load)
    row.update({f"load_{key}": load.get(key) for key in LOAD_FIELDS})
    for key, value in metrics.items():
        if key in DIST_METRICS:
            row.update({f"{key}_{field}": (value or {}).get(field) for field in DIST_FIELDS})
        else:
            row[key] = value
    row.update(_acceptance_fields(result.get("acceptance")))
    theory = result.get("theory") or {}
    row["predicted_speedup"] = theory.get("predicted_speedup")
    row["theory_alpha"] = theory.get("alpha")
    row["theory_cost_ratio"] = theory.get("cost_ratio")
    row.update(_energy_fields(result.get("energy") or {}))
    memory = result.get("memory") or {}
    row.update({f"memory_{key}": memory.get(key) for key in ("device", "weights_mb", "peak_mb", "peak_over_needed", "growth_over_needed")})
    correctness = result.get("correctness") or {}
    row["correctness_identical"] = correctness.get("identical")
    failure = result.get("failure") or {}
    row.update({f"failure_{key}": failure.get(key) for key in ("type", "message", "phase")})
    for key, value in (result.get("metadata") or {}).items():
        row[f"meta_{key}"] = ", ".join(map(str, value)) if isinstance(value, list) else value
    return row


def _acceptance_fields(acceptance: dict | None) -> dict[str, Any]:
    acceptance = acceptance or {}
    fields = {
        key: acceptance.get(key)
        for key in (
            "drafted_tokens",
            "accepted_tokens",
            "target_forwards",
            "acceptance_rate",
            "mean_accepted_length",
        )
    }
    # Kept as JSON text so that the tidy table stays flat and round-trips through CSV.
    fields["acceptance_per_position"] = json.dumps(acceptance.get("per_position") or [])
    return fields


def _energy_fields(energy: dict) -> dict[str, Any]:
    """Energy stays missing (never 0) unless the run measured it."""
    available = bool(energy.get("available"))
    total = energy.get("gross_j") if available else None
    per_token = energy["per_output_token_j"]["gross"] if available else None
    return {
        "energy_available": available,
        "energy_method": energy.get("method"),
        "energy_reason": energy.get("reason"),
        "energy_j": total,
        "energy_j_per_token": per_token,
    }


def load_label(load: dict) -> str:
    """A short, stable name for a load setting, e.g. `closed` or `open 2/s poisson`."""
    if not load or load.get("mode", "closed") == "closed":
        return "closed"
    parts = [f"open {load.get('rate')}/s", str(load.get("arrival", "poisson"))]
    if load.get("arrival") == "gamma":
        parts.append(f"cv{load.get('burstiness')}")
    return " ".join(parts)


def runs_table(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per result file (every status)."""
    rows = [flatten_result(load_result(path), path) for path in paths]
    if not rows:
        raise ResultFileError("no result files given to aggregate")
    runs = pd.DataFrame(rows)
    runs["cell_name"] = runs["cell"].map(cell_name)
    runs["method_label"] = [method_label(m, d) for m, d in zip(runs["method"], runs["drafter"])]
    return runs.sort_values(["experiment", "cell"], kind="stable").reset_index(drop=True)


def results_of_experiment(paths: Iterable[str], experiment: str) -> list[str]:
    """The paths `results/runs/{experiment}/{cell}/result.json` that belong to `experiment`."""
    return [p for p in paths if Path(p).parent.parent.name == experiment]


def cell_name(cell: str) -> str:
    """The cell's name without its repeat suffix (`...--r0`)."""
    return re.sub(r"--r\d+$", "", cell)


def method_label(method: str, drafter: Any) -> str:
    return f"{method} ({drafter})" if isinstance(drafter, str) and drafter else method


# --- statistics ----------------------------------------------------------------------------


def _key(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """A hashable key per row that treats missing values (AR's gamma, drafter) as equal."""
    return (
        frame[list(keys)]
        .astype(object)
        .where(frame[list(keys)].notna(), None)
        .apply(lambda row: json.dumps(list(row), default=str), axis=1)
    )


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
    runs = runs.assign(_cell=_key(runs, CELL_KEYS), _match=_key(runs, AR_MATCH_KEYS))
    ok = runs[runs["status"] == "ok"]
    failures = runs[runs["status"] != "ok"]["_cell"].value_counts()
    baselines = {match: group for match, group in ok[ok["method"] == "ar"].groupby("_match")}
    rows = []
    for _, cell in ok.groupby("_cell", sort=False):
        baseline = baselines.get(cell["_match"].iloc[0])
        row = _summarise_cell(cell, baseline, settings)
        row["n_failed"] = int(failures.get(cell["_cell"].iloc[0], 0))
        if row["n_failed"]:
            row["flags"] = "; ".join(filter(None, [row["flags"], f"{row['n_failed']} failed"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _summarise_cell(cell: pd.DataFrame, baseline: pd.DataFrame | None, settings: dict) -> dict:
    first = cell.iloc[0]
    row: dict[str, Any] = {key: first[key] for key in (*CELL_KEYS, "load_mode", "load_rate")}
    row.update(
        cell=first["cell_name"],
        method_label=first["method_label"],
        n_repeats=len(cell),
        repeats=", ".join(map(str, sorted(cell["repeat"]))),
    )
    for metric in SUMMARY_METRICS:
        if metric in RATIOS:
            values = _paired_ratios(cell, baseline, RATIOS[metric]) if baseline is not None else []
        else:
            values = _numeric(cell, metric).dropna().to_numpy()
        ci_settings = {k: settings[k] for k in ("confidence", "n_resamples", "seed")}
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


def failed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs whose status is not ok, with the failure the runner recorded."""
    failed = runs[runs["status"] != "ok"]
    columns = ["experiment", "cell", "status", "failure_type", "failure_message", "failure_phase"]
    return (
        failed[columns]
        .rename(
            columns={"failure_type": "type", "failure_message": "message", "failure_phase": "phase"}
        )
        .reset_index(drop=True)
    )


RUN_INFO_FIELDS = {
    "meta_host": "host",
    "meta_devices": "devices",
    "meta_cpu": "CPU",
    "meta_cuda": "CUDA",
    "meta_driver": "driver",
    "meta_torch": "torch",
    "meta_transformers": "transformers",
    "meta_specdec": "specdec",
    "meta_git_commit": "git commit",
    "target": "targets",
    "method_label": "methods",
    "dataset": "datasets",
    "batch_size": "batch sizes",
    "load": "loads",
    "max_new_tokens": "max new tokens",
    "temperature": "temperatures",
    "placement_strategy": "placements",
    "energy_method": "energy method",
    "energy_reason": "energy unavailable because",
}


def run_info_table(runs: pd.DataFrame) -> pd.DataFrame:
    """What was run, where and with which versions: distinct values over all runs."""
    rows = [("runs", f"{len(runs)} ({(runs['status'] == 'ok').sum()} ok)")]
    if "meta_started_at" in runs:
        rows.append(("started", str(runs["meta_started_at"].dropna().min())))
    if "meta_finished_at" in runs:
        rows.append(("finished", str(runs["meta_finished_at"].dropna().max())))
    for column, label in RUN_INFO_FIELDS.items():
        if column in runs:
            values = sorted({str(v) for v in runs[column].dropna()})
            rows.append((label, ", ".join(values) if values else DASH))
    return pd.DataFrame(rows, columns=["field", "value"])


# --- presentation --------------------------------------------------------------------------


def display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as text for people: `median [low, high]`, ms for latencies, dashes."""
    shown = pd.DataFrame(
        {
            "cell": summary["cell"],
            "method": summary["method_label"],
            "gamma": summary["gamma"].map(_format_int),
            "dataset": summary["dataset"],
            "batch": summary["batch_size"].map(_format_int),
            "load": summary["load"],
            "n": summary["n_repeats"],
        }
    )
    for metric, heading in SUMMARY_METRICS.items():
        scale = 1000.0 if heading.endswith("(ms)") else 1.0
        shown[heading] = [
            _format_estimate(row, metric, scale, no_baseline=metric in RATIOS)
            for _, row in summary.iterrows()
        ]
    shown["flags"] = summary["flags"].replace("", DASH)
    return shown


def _format_int(value: Any) -> str:
    return DASH if pd.isna(value) else str(int(value))


def _format_estimate(row: pd.Series, metric: str, scale: float, no_baseline: bool) -> str:
    if no_baseline and row["baseline"] == NO_BASELINE:
        return NO_BASELINE
    value = row[metric]
    if pd.isna(value):
        return DASH
    if row["n_repeats"] == 1:
        return f"{_number(value * scale)} (n=1)"
    low, high = row[f"{metric}_ci_low"] * scale, row[f"{metric}_ci_high"] * scale
    return f"{_number(value * scale)} [{_number(low)}, {_number(high)}]"


def _number(value: float) -> str:
    """Three significant digits without scientific notation for large values."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


CSS = """
body { font-family: system-ui, sans-serif; font-size: 13px; color: #222; margin: 1em; }
h1 { font-size: 16px; }
table.specdec { border-collapse: collapse; }
table.specdec th, table.specdec td { padding: 3px 8px; border-bottom: 1px solid #ddd;
  text-align: right; white-space: nowrap; }
table.specdec th { background: #f3f3f3; position: sticky; top: 0; }
table.specdec td:first-child, table.specdec th:first-child { text-align: left; }
table.specdec tr:hover td { background: #fafae0; }
p.note { color: #555; }
"""


def write_table(
    table: pd.DataFrame,
    stem: str | Path,
    title: str,
    shown: pd.DataFrame | None = None,
    note: str = "",
    empty: str = "No rows.",
) -> list[Path]:
    """`stem`.csv holds `table`; `stem`.md and `stem`.html hold `shown` (default: `table`)."""
    stem = Path(stem)
    shown = table if shown is None else shown
    paths = [stem.with_suffix(ext) for ext in (".csv", ".md", ".html")]
    with atomic_open(paths[0]) as handle:
        table.to_csv(handle, index=False)
    body_md = shown.to_markdown(index=False) if len(shown) else f"_{empty}_"
    with atomic_open(paths[1]) as handle:
        handle.write(f"# {title}\n\n{note + chr(10) + chr(10) if note else ''}{body_md}\n")
    body_html = (
        shown.to_html(index=False, classes="specdec", border=0, na_rep=DASH)
        if len(shown)
        else f"<p>{empty}</p>"
    )
    note_html = f'<p class="note">{note}</p>' if note else ""
    with atomic_open(paths[2]) as handle:
        handle.write(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{CSS}</style></head><body><h1>{title}</h1>{note_html}{body_html}"
            "</body></html>\n"
        )
    return paths


def aggregate_experiment(
    result_paths: Iterable[str | Path], out_dir: str | Path, experiment: str, **settings: Any
) -> dict[str, list[Path]]:
    """Write runs, summary, failed and run-info tables of one experiment under `out_dir`."""
    settings = merge_settings(settings, DEFAULT_SETTINGS, "aggregate")
    out_dir = Path(out_dir)
    runs = runs_table(result_paths)
    foreign = sorted(set(runs["experiment"]) - {experiment})
    if foreign:
        raise ResultFileError(f"results of experiment {experiment!r} include {foreign}")
    summary = summary_table(runs, **settings)
    failed = failed_table(runs)
    note = (
        f"Median over repeats with {settings['confidence']:.0%} bootstrap interval "
        f"[low, high]; ratios against the matching AR cell; flags: repeats with coefficient "
        f"of variation above {settings['cv_threshold']}."
    )
    return {
        "runs": write_table(runs, out_dir / "runs", f"{experiment}: all runs"),
        "summary": write_table(
            summary,
            out_dir / "summary",
            f"{experiment}: summary",
            display_summary(summary) if len(summary) else summary,
            note=note,
            empty="No successful runs.",
        ),
        "failed": write_table(
            failed,
            out_dir / "failed",
            f"{experiment}: failed runs",
            empty=f"All {len(runs)} runs succeeded.",
        ),
        "run_info": write_table(
            run_info_table(runs), out_dir / "run_info", f"{experiment}: what was run"
        ),
    }
