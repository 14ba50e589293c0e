"""Tables for people and files: the display form of the summary (`median [low, high]`, ms,
dashes) and the writers of CSV, Markdown and styled HTML copies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from specdec.io import atomic_open
from specdec.summary import NO_BASELINE, RATIOS, SUMMARY_METRICS

DASH = "–"
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


def display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as text for people: `median [low, high]`, ms for latencies, dashes."""
    shown = pd.DataFrame(
        {
            "cell": summary["cell"],
            "method": summary["method_label"],  # the engine's name first, unless ours
            # AR drafts nothing: gamma 0 is shown as a dash.
            "gamma": summary["gamma"].where(summary["gamma"] > 0).map(_format_int),
            "dataset": summary["dataset"],
            "batch": summary["batch_size"].map(_format_int),
            "load": summary["load"],
            "n": summary["n_repeats"],
        }
    )
    for metric, heading in SUMMARY_METRICS.items():
        if summary[metric].isna().all() and metric not in RATIOS:
            continue  # measured by no cell (energy without a power sensor, goodput without SLOs)
        scale = 1000.0 if heading.endswith("(ms)") else 1.0
        against_ar = metric in RATIOS and RATIOS[metric].baseline == "ar_group_id"
        shown[heading] = [_format_estimate(row, metric, scale, no_baseline=against_ar) for _, row in summary.iterrows()]
    # greedy divergences from the AR reference: floating-point near-ties, and defects
    shown["near-ties"] = summary["near_ties"].map(_format_int)
    shown["defects"] = summary["defects"].map(_format_int)
    # which AR the ratios divide by: the AR cell, or the AR interleaved in the cell's own job
    shown["AR reference"] = summary["reference"].fillna(DASH)
    shown["flags"] = summary["flags"].replace("", DASH)
    return shown


def display_categories(categories: pd.DataFrame) -> pd.DataFrame:
    """The per-category table for people: three significant digits, dashes, no AR baseline."""
    shown = categories.drop(columns=["drafted_tokens", "accepted_tokens"]).rename(
        columns={"method_label": "method", "batch_size": "batch", "n_repeats": "repeats", "n_requests": "requests",
                 "speedup_requests": "paired requests", "acceptance_rate": "acceptance",
                 "mean_accepted_length": "mean accepted length"}
    )
    shown["speedup"] = [
        NO_BASELINE if baseline == NO_BASELINE else DASH if pd.isna(value) else _number(value)
        for value, baseline in zip(categories["speedup"], categories["baseline"])
    ]
    for column in ("acceptance", "mean accepted length"):
        shown[column] = shown[column].map(lambda value: DASH if pd.isna(value) else _number(value))
    return shown.drop(columns=["baseline"])


def _format_int(value: Any) -> str:
    return DASH if pd.isna(value) else str(int(value))


def _format_estimate(row: pd.Series, metric: str, scale: float, no_baseline: bool) -> str:
    if no_baseline and row["baseline"] == NO_BASELINE:
        return NO_BASELINE
    value = row[metric]
    if pd.isna(value):
        return DASH
    low, high = row[f"{metric}_ci_low"] * scale, row[f"{metric}_ci_high"] * scale
    if row["n_repeats"] == 1 and low == high:  # one repeat, and no interval over requests
        return f"{_number(value * scale)} (n=1)"
    return f"{_number(value * scale)} [{_number(low)}, {_number(high)}]"


def _number(value: float) -> str:
    """Three significant digits without scientific notation for large values."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    with atomic_open(path) as handle:
        table.to_csv(handle, index=False)
    return path


def write_html(shown: pd.DataFrame, path: str | Path, title: str, note: str = "", empty: str = "No rows.") -> Path:
    """One table as an HTML page: the Snakemake report shows HTML inline (CSV only downloads)."""
    path = Path(path)
    body = shown.to_html(index=False, classes="specdec", border=0, na_rep=DASH) if len(shown) else f"<p>{empty}</p>"
    note_html = f'<p class="note">{note}</p>' if note else ""
    with atomic_open(path) as handle:
        handle.write(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{CSS}</style></head><body><h1>{title}</h1>{note_html}{body}"
            "</body></html>\n"
        )
    return path


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
    csv = write_csv(table, stem.with_suffix(".csv"))
    md = stem.with_suffix(".md")
    body_md = shown.to_markdown(index=False) if len(shown) else f"_{empty}_"
    with atomic_open(md) as handle:
        handle.write(f"# {title}\n\n{note + chr(10) + chr(10) if note else ''}{body_md}\n")
    return [csv, md, write_html(shown, stem.with_suffix(".html"), title, note, empty)]
