"""Tables for people and files: the display form of the summary (`median [low, high]`, ms,
dashes), the report's headline (its first page), and the writers of CSV, Markdown and styled
HTML copies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from specdec.io import atomic_open
from specdec.report import columns as col
from specdec.report.summary import NO_BASELINE, RATIOS, SUMMARY_METRICS, answer_metric

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
            "cell": summary[col.CELL],
            "method": summary[col.METHOD_LABEL],  # the engine's name first, unless ours
            # AR drafts nothing: gamma 0 is shown as a dash.
            "gamma": summary[col.GAMMA].where(summary[col.GAMMA] > 0).map(_format_int),
            "dataset": summary[col.DATASET],
            "batch": summary[col.BATCH_SIZE].map(_format_int),
            "load": summary[col.LOAD],
            "n": summary[col.N_REPEATS],
        }
    )
    for metric, heading in SUMMARY_METRICS.items():
        if summary[metric].isna().all() and metric not in RATIOS:
            continue  # measured by no cell (energy without a power sensor, goodput without SLOs)
        scale = 1000.0 if heading.endswith("(ms)") else 1.0
        against_ar = metric in RATIOS and RATIOS[metric].baseline == col.AR_GROUP_ID
        shown[heading] = [_format_estimate(row, metric, scale, no_baseline=against_ar) for _, row in summary.iterrows()]
    # greedy divergences from the AR reference: floating-point near-ties, and defects
    shown["near-ties"] = summary[col.NEAR_TIES].map(_format_int)
    shown["defects"] = summary[col.DEFECTS].map(_format_int)
    # which AR the ratios divide by: the AR cell, or the AR interleaved in the cell's own job
    shown["AR reference"] = summary[col.REFERENCE].fillna(DASH)
    shown["flags"] = summary[col.FLAGS].replace("", DASH)
    return shown


def display_categories(categories: pd.DataFrame) -> pd.DataFrame:
    """The per-category table for people: three significant digits, dashes, no AR baseline."""
    shown = categories.drop(columns=[col.DRAFTED_TOKENS, col.ACCEPTED_TOKENS]).rename(
        columns={col.METHOD_LABEL: "method", col.BATCH_SIZE: "batch", col.N_REPEATS: "repeats", col.N_REQUESTS: "requests",
                 col.SPEEDUP_REQUESTS: "paired requests", col.ACCEPTANCE_RATE: "acceptance",
                 col.MEAN_ACCEPTED_LENGTH: "mean accepted length"}
    )
    shown[col.SPEEDUP] = [
        NO_BASELINE if baseline == NO_BASELINE else DASH if pd.isna(value) else _number(value)
        for value, baseline in zip(categories[col.SPEEDUP], categories[col.BASELINE])
    ]
    for column in ("acceptance", "mean accepted length"):
        shown[column] = shown[column].map(lambda value: DASH if pd.isna(value) else _number(value))
    return shown.drop(columns=[col.BASELINE])


# Settings of a drafting cell that the headline names: a column where they vary, else a
# sentence over the table.
HEADLINE_SETTINGS = {
    col.GAMMA: "γ",
    col.BATCH_SIZE: "batch",
    col.LOAD: "load",
    col.TEMPERATURE: "T",
    col.MAX_NEW_TOKENS: "new tokens",
}
# Beside the speedup: the prediction, and why a method pays or loses.
HEADLINE_WHY = {
    col.PREDICTED_SPEEDUP: "predicted",
    col.ACCEPTANCE_RATE: "acceptance",
    col.MEAN_ACCEPTED_LENGTH: "mean accepted length",
    col.THEORY_COST_RATIO: "c",
}
AXIS_NAMES = {col.BATCH_SIZE: "batch size", col.LOAD_RATE: "request rate (req/s)"}


NOT_DISTINGUISHABLE = "not distinguishable"


def display_headline(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The answer per drafting cell: its speedup over AR with the CI (throughput's under a
    closed load, E2E latency's under an open one: `answer_metric`) and whether the CI tells
    it from AR, the Leviathan et al. prediction, and why: acceptance (rate and mean accepted
    length) and the drafter's cost ratio c; then the cell's flags. The settings that vary are
    columns, and the text returned beside the table names those every row shares."""
    cells = summary[summary[col.METHOD] != "ar"].sort_values([col.METHOD_LABEL, col.DATASET, *HEADLINE_SETTINGS])
    varying = [c for c in HEADLINE_SETTINGS if cells[c].astype(str).nunique() > 1]
    shared = [f"{HEADLINE_SETTINGS[c]} {plain(cells[c].iloc[0])}" for c in HEADLINE_SETTINGS if c not in varying and len(cells)]
    shown = pd.DataFrame({"method": cells[col.METHOD_LABEL], "dataset": cells[col.DATASET]})
    for column in varying:
        shown[HEADLINE_SETTINGS[column]] = cells[column].map(plain)
    shown["speedup [95 % CI]"] = [
        _format_estimate(row, answer_metric(row[col.LOAD_MODE]), 1.0, no_baseline=True)
        + ("" if row[col.LOAD_MODE] == "closed" else " (E2E)")
        for _, row in cells.iterrows()
    ]
    shown["vs AR"] = [_against_ar(row, answer_metric(row[col.LOAD_MODE])) for _, row in cells.iterrows()]
    for column, heading in HEADLINE_WHY.items():
        shown[heading] = cells[column].map(lambda value: DASH if pd.isna(value) else _number(value))
    shown["flags"] = cells[col.FLAGS].fillna("").replace("", DASH)
    return shown.reset_index(drop=True), ("Every cell: " + ", ".join(shared) + ".") if shared else ""


def _against_ar(row: pd.Series, metric: str) -> str:
    """Where the speedup's interval lies against 1: `faster`, `slower`, or not
    distinguishable from AR (it includes 1); a dash without an interval or a baseline."""
    low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if row["baseline"] == NO_BASELINE or pd.isna(low) or pd.isna(high) or (row["n_repeats"] == 1 and low == high):
        return DASH
    return NOT_DISTINGUISHABLE if low <= 1 <= high else "faster" if low > 1 else "slower"


def display_break_even(break_even: pd.DataFrame) -> pd.DataFrame:
    """The break-even table (`sweeps.break_even_table`) in three columns: series, axis, point."""
    return pd.DataFrame(
        {
            "series": break_even[col.SERIES],
            "along": break_even[col.AXIS].map(AXIS_NAMES),
            "speedup falls below 1 at (95 % CI)": break_even[col.BREAK_EVEN],
        }
    )


def plain(value: Any) -> str:
    """A setting as text: whole floats without their `.0`."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _format_int(value: Any) -> str:
    return DASH if pd.isna(value) else str(int(value))


def _format_estimate(row: pd.Series, metric: str, scale: float, no_baseline: bool) -> str:
    if no_baseline and row[col.BASELINE] == NO_BASELINE:
        return NO_BASELINE
    value = row[metric]
    if pd.isna(value):
        return DASH
    low, high = row[f"{metric}_ci_low"] * scale, row[f"{metric}_ci_high"] * scale
    if row[col.N_REPEATS] == 1 and low == high:  # one repeat, and no interval over requests
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


def _html_table(shown: pd.DataFrame, empty: str, classes: str = "specdec") -> str:
    return shown.to_html(index=False, classes=classes, border=0, na_rep=DASH) if len(shown) else f"<p>{empty}</p>"


def write_html(shown: pd.DataFrame, path: str | Path, title: str, note: str = "", empty: str = "No rows.") -> Path:
    """One table as an HTML page: the Snakemake report shows HTML inline (CSV only downloads)."""
    path = Path(path)
    body = _html_table(shown, empty)
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


# Scoped to the headline's own elements (and the figure that follows it there): the report's
# first page includes the fragment in Snakemake's own page, whose styles it must neither take
# over nor lose to.
HEADLINE_CSS = """
.specdec-headline { font-size: 12px; color: #222; margin: 0 0 1.5em 0; }
.specdec-headline h2 { font-size: 15px; margin: 0.6em 0 0.3em 0; }
.specdec-headline h3 { font-size: 13px; margin: 0.8em 0 0.3em 0; }
.specdec-headline table.specdec { border-collapse: collapse; margin: 0; width: auto; font-size: 12px; }
.specdec-headline table.specdec th, .specdec-headline table.specdec td { padding: 2px 6px;
  border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
.specdec-headline table.specdec th { background: #f3f3f3; }
.specdec-headline table.specdec td:first-child, .specdec-headline table.specdec th:first-child { text-align: left; }
.specdec-headline table.specdec td:last-child { white-space: normal; text-align: left; min-width: 10em; }
.specdec-headline p { margin: 0.2em 0; color: #555; }
.specdec-headline table.break-even td:first-child { white-space: normal; }
.specdec-figure svg { width: 100%; max-width: 42rem; height: auto; }
"""


def write_headline(summary: pd.DataFrame, break_even: pd.DataFrame, stem: str | Path, experiment: str) -> list[Path]:
    """The answer of one experiment (`display_headline`, and `display_break_even` where it
    sweeps): `stem`.html, an HTML fragment that the report's first page includes (and the
    report shows on its own), and `stem`.md."""
    stem = Path(stem)
    shown, shared = display_headline(summary)
    points = display_break_even(break_even)
    empty = "No drafting cell ran successfully."
    note = (f"{shared} Speedup: median over repeats; vs AR: {NOT_DISTINGUISHABLE} where the interval includes 1; "
            "predicted: Leviathan et al. from the measured α and costs (token trees: the tree theory of the trees "
            "table), prefills added. Why: acceptance = accepted / "
            "drafted tokens, mean accepted length = output tokens per target forward, c = the drafter's one-token "
            "forward over the target's; drafting pays when acceptance is high and c low.").strip()
    title = f"{experiment}: speedup over AR"
    html = [f"<h2>{title}</h2>", f"<p>{note}</p>", _html_table(shown, empty)]
    md = [f"# {title}", note, shown.to_markdown(index=False) if len(shown) else f"_{empty}_"]
    if len(points):
        heading = "Where speculation stops paying"
        html += [f"<h3>{heading}</h3>", _html_table(points, "", classes="specdec break-even")]
        md += [f"## {heading}", points.to_markdown(index=False)]
    with atomic_open(stem.with_suffix(".html")) as handle:
        handle.write(
            f"<div class='specdec-headline'><meta charset='utf-8'><style>{HEADLINE_CSS}</style>"
            + "\n".join(html)
            + "</div>\n"
        )
    with atomic_open(stem.with_suffix(".md")) as handle:
        handle.write("\n\n".join(md) + "\n")
    return [stem.with_suffix(".html"), stem.with_suffix(".md")]
