"""Figures of one experiment, drawn from its declared tables only (`TABLES`, written by
`specdec.report.aggregate`); never opens a run's own files.

Each figure in `FIGURES` is a folder of its name holding its PNG and SVG, or nothing where
its data is absent (no open-loop runs, no energy on a CPU...): such a figure is not drawn, and
`left_out.html` names it and says why, one line each. Whether data exists is only known after
the benchmarks ran, while Snakemake needs the outputs when it builds the DAG: the folders are
the outputs, and the report includes the pictures it finds in them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from specdec.io import atomic_open  # noqa: E402
from specdec.report import columns as col  # noqa: E402
from specdec.report import sweeps, theory  # noqa: E402
from specdec.report.summary import merge_settings  # noqa: E402
from specdec.report.tables import plain  # noqa: E402

# The tables of `tables/{experiment}/` that the figures read (`{name}.csv`).
TABLES = ("runs", "summary", "categories", "requests", "itl", "positions", "tree_sizes", "power")

DEFAULT_OPTIONS = {
    "dpi": 150,  # PNG resolution
    "font_size": 9,
    "width_in": 6.4,  # one panel; multi-panel figures scale from it
    "height_in": 4.0,
    "cdf_log_x": True,  # latency CDFs on a log time axis
    "max_power_panels": 6,  # power timelines drawn (first repeat of each cell)
}
# Okabe-Ito: distinguishable with colour-vision deficiency and in greyscale print.
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
LINESTYLES = ("-", "--", ":", "-.")
HATCHES = {"-": "", "--": "//", ":": "..", "-.": "xx"}  # a line style's stand-in on bars
MARKERS = ("o", "s", "^", "D", "v", "P")
# Settings that tell series apart when they vary inside one figure.
SERIES_SETTINGS = {
    col.TARGET: "",
    col.DATASET: "",
    col.BATCH_SIZE: "b",
    col.LOAD: "",
    "load_num_requests": "req",
    "load_duration_s": "d",
    col.GAMMA: "γ",
    col.MAX_NEW_TOKENS: "n",
    col.TEMPERATURE: "T",
    col.PLACEMENT_STRATEGY: "",
}


def plot_options(options: dict | None) -> dict:
    """The `plots:` configuration over the defaults (unknown keys are an error)."""
    return merge_settings(options, DEFAULT_OPTIONS, "plots")


@dataclass
class PlotData:
    """The tables of one experiment (`TABLES`) and the plot options."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    categories: pd.DataFrame
    requests: pd.DataFrame
    itl: pd.DataFrame
    positions: pd.DataFrame
    tree_sizes: pd.DataFrame
    power: pd.DataFrame
    options: dict

    @classmethod
    def read(cls, tables: Mapping[str, str | Path], options: dict | None = None) -> PlotData:
        """From the CSV file of each name in `TABLES`."""
        return cls(**{name: pd.read_csv(tables[name]) for name in TABLES}, options=plot_options(options))

    @cached_property
    def ok_runs(self) -> pd.DataFrame:
        return self.runs[self.runs[col.STATUS] == "ok"]

    def with_settings(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` (with a `cell_name` column) beside each cell's method label and settings."""
        cells = self.ok_runs.drop_duplicates(col.CELL_NAME)
        return frame.merge(cells[[col.CELL_NAME, col.METHOD_LABEL, *SERIES_SETTINGS]], on=col.CELL_NAME)

    @cached_property
    def colors(self) -> dict[str, str]:
        labels = sorted(self.runs[col.METHOD_LABEL].unique(), key=lambda m: (m != "ar", m))
        return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}

    @cached_property
    def footer(self) -> str:
        first = self.runs.iloc[0]

        def distinct(column: str) -> str:
            values = sorted({str(v) for v in self.runs.get(column, pd.Series()).dropna()})
            return ", ".join(values) or "?"

        return (
            f"experiment {first['experiment']} · host {distinct('meta_host')} · devices "
            f"{distinct('meta_devices')} · torch {distinct('meta_torch')} · transformers "
            f"{distinct('meta_transformers')} · specdec {distinct('meta_specdec')} · git "
            f"{distinct('meta_git_commit')}"
        )


# --- helpers -------------------------------------------------------------------------------


def series_labels(frame: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """Method label plus the settings that vary within `frame` (except `exclude`)."""
    varying = [
        c
        for c in SERIES_SETTINGS
        if c not in exclude and c in frame and frame[c].astype(str).nunique() > 1
    ]

    def label(row: pd.Series) -> str:
        parts = [row[col.METHOD_LABEL]]
        # Settings that do not apply are left out: missing ones (a closed loop's size) and
        # AR's gamma 0.
        parts += [
            f"{SERIES_SETTINGS[c]}{plain(row[c])}"
            for c in varying
            if not pd.isna(row[c]) and not (c == col.GAMMA and row[c] == 0)
        ]
        return " · ".join(parts)

    return frame.apply(label, axis=1) if len(frame) else pd.Series(dtype=str)


def _styles(data: PlotData, frame: pd.DataFrame, labels: pd.Series) -> dict[str, dict]:
    """Colour by method; line style and marker tell apart series of one method."""
    styles, seen = {}, {}
    for label, method in zip(labels, frame[col.METHOD_LABEL]):
        if label in styles:
            continue
        k = seen[method] = seen.get(method, -1) + 1
        styles[label] = dict(
            color=data.colors[method],
            linestyle=LINESTYLES[k % len(LINESTYLES)],
            marker=MARKERS[k % len(MARKERS)],
        )
    return styles


def _errors(frame: pd.DataFrame, metric: str, scale: float = 1.0) -> np.ndarray:
    low = (frame[metric] - frame[f"{metric}_ci_low"]).clip(lower=0) * scale
    high = (frame[f"{metric}_ci_high"] - frame[metric]).clip(lower=0) * scale
    return np.vstack([low.to_numpy(), high.to_numpy()])


def _log_time_axis(ax: plt.Axes, values: list[float]) -> None:
    """A log x-axis labelled at 1, 2 and 5 per decade in plain numbers (matplotlib's own
    labels, `6×10^2` and the minor ones, run into each other in a narrow panel), and at
    least a factor 2 wide on each side when the values are (nearly) one, where autoscaling
    would zoom into floating-point noise around it."""
    ax.set_xscale("log")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) < 1.5:
        ax.set_xlim(min(positive) / 2, max(positive) * 2)
    ax.xaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())


def _legend_beside(fig: plt.Figure, title: str) -> None:
    """The legend beside the panels, where it hides no bar (shares and rates reach 1.0), and
    the title over the whole figure: an axes title runs under a legend beside a narrow
    panel, a figure title above one centred on the panels' height does not."""
    fig.suptitle(title)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right center")


def _figure(data: PlotData, ncols: int = 1, nrows: int = 1, **kwargs) -> tuple[plt.Figure, Any]:
    size = (
        data.options["width_in"] * (1 + 0.55 * (ncols - 1)),
        data.options["height_in"] * (1 + 0.7 * (nrows - 1)),
    )
    return plt.subplots(nrows, ncols, figsize=size, layout="constrained", squeeze=False, **kwargs)


def _line_plot(
    data: PlotData,
    ax: plt.Axes,
    frame: pd.DataFrame,
    x: str,
    metric: str,
    exclude: tuple,
    scale: float = 1.0,
) -> dict[str, dict]:
    """One line per series of `frame`: `metric` against `x`, with CI error bars."""
    labels = series_labels(frame, exclude=(x, *exclude))
    styles = _styles(data, frame, labels)
    for label, group in frame.assign(_series=labels).groupby("_series", sort=True):
        group = group.sort_values(x)
        ax.errorbar(group[x], group[metric] * scale, yerr=_errors(group, metric, scale), capsize=3,
                    label=label, **styles[label])
    return styles


# The sweep axes a figure can draw along: label, and how the axis is scaled.
SWEEP_AXES = {
    col.GAMMA: "draft length γ",
    col.BATCH_SIZE: "batch size",
    col.LOAD_RATE: "offered request rate (requests/s)",
}


@dataclass(frozen=True)
class Overlay:
    """A second metric drawn over `_along`'s: a line per series in the line form (`line`:
    its style over the series' own), a `marker` on each bar in the bar form."""

    metric: str
    label: str  # its legend entry ("_nolegend_" for none)
    line: dict
    marker: str = "x"


def _batch_size_axis(ax: plt.Axes, sizes) -> None:
    """Batch sizes on a log2 axis, each measured size a tick named plainly."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(sizes))
    ax.set_xticks(ticks, map(plain, ticks))


def swept(frame: pd.DataFrame, axis: str) -> bool:
    """Whether `frame` measured two or more values of `axis`: only then a line over it."""
    return frame[axis].nunique() >= 2


def _along(
    data: PlotData,
    ax: plt.Axes,
    frame: pd.DataFrame,
    axis: str,
    metric: str,
    label: str,
    exclude: tuple[str, ...] = (),
    scale: float = 1.0,
    overlays: tuple[Overlay, ...] = (),
    reference: float | None = None,
    legend: bool = True,
) -> None:
    """`metric` (axis title `label`) of each series of `frame` as a line over the sweep
    axis `axis` where the figure measured two or more of its values (`swept`), else as one
    horizontal bar per cell with its CI, labelled by method and settings: a line over a
    single point would only draw an axis of floating-point width around it. `reference`
    (e.g. AR's speedup of 1) is a grey line across the metric's axis."""
    if swept(frame, axis):
        styles = _line_plot(data, ax, frame, axis, metric, exclude=exclude, scale=scale)
        labels = series_labels(frame, exclude=(axis, *exclude))
        for overlay in overlays:
            for name, group in frame.assign(_series=labels).dropna(subset=[overlay.metric]).groupby("_series"):
                group = group.sort_values(axis)
                style = {**styles[name], **overlay.line}
                ax.plot(group[axis], group[overlay.metric] * scale, label="_nolegend_", **style)
        if axis == col.BATCH_SIZE:
            _batch_size_axis(ax, frame[axis])
        elif axis == col.GAMMA:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel=SWEEP_AXES[axis], ylabel=label)
        if reference is not None:
            ax.axhline(reference, color="0.5", linewidth=0.8)
    else:
        labels = series_labels(frame, exclude=(axis, *exclude))
        order = sorted(range(len(frame)), key=lambda i: (frame[col.METHOD_LABEL].iloc[i] != "ar", labels.iloc[i]))
        rows, labels = frame.iloc[order], labels.iloc[order]
        styles = _styles(data, rows, labels)
        y = np.arange(len(rows))
        ax.barh(y, rows[metric] * scale, xerr=_errors(rows, metric, scale), capsize=3,
                color=[styles[name]["color"] for name in labels],
                hatch=[HATCHES[styles[name]["linestyle"]] for name in labels], edgecolor="white")
        for overlay in overlays:
            ax.plot(rows[overlay.metric] * scale, y, linestyle="", marker=overlay.marker, color="black", label="_nolegend_")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set(xlabel=label, ylabel=f"at {SWEEP_AXES[axis]} = {plain(frame[axis].iloc[0])}")
        if reference is not None:
            ax.axvline(reference, color="0.5", linewidth=0.8)
    for overlay in overlays:
        if overlay.label != "_nolegend_":  # on bars the overlay is a marker without a line
            line = overlay.line if swept(frame, axis) else {"linestyle": "", "marker": overlay.marker}
            ax.plot([], [], **{"color": "0.3", **line}, label=overlay.label)
    if legend and ax.get_legend_handles_labels()[1]:
        # beside the panel: inside, a sweep's many series hide their own lines
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


# --- figures -------------------------------------------------------------------------------
# Each returns a Figure, or a string saying why the figure has no data.


PREDICTION = Overlay(
    col.PREDICTED_SPEEDUP,
    "predicted (Leviathan et al., prefills added)",
    dict(linestyle=(0, (1, 1)), linewidth=1.2, alpha=0.8, marker="x"),
)


def speedup_vs_gamma(data: PlotData) -> plt.Figure | str:
    """Measured and predicted speedup of each closed-loop drafting cell: over γ where the
    experiment sweeps it, else a bar per cell (the report's headline figure)."""
    frame = data.summary[
        (data.summary[col.GAMMA] > 0)
        & data.summary[col.SPEEDUP].notna()
        & (data.summary[col.LOAD] == "closed")
    ]
    if frame.empty:
        return "no closed-loop speculative cell with a matching AR baseline"
    fig, axes = _figure(data)
    ax = axes[0, 0]
    _along(data, ax, frame, col.GAMMA, col.SPEEDUP, "speedup over AR (tokens/s ratio)",
           overlays=(PREDICTION,), reference=1.0)
    ax.set_title("Speedup vs draft length" if swept(frame, col.GAMMA) else "Speedup over AR per cell")
    return fig


def speedup_vs_tree_size(data: PlotData) -> plt.Figure | str:
    """Speedup against the nodes a drafting step verifies, a panel per drafter (its chain and
    trees) and dataset: each measured cell with its interval, and the speedup the tree theory
    predicts for the best tree of each size (`theory.best_tree_table`)."""
    frame = data.tree_sizes
    panels = list(frame.groupby(["label", "family"], sort=True))  # by drafter, then dataset
    if not panels:
        return "no drafter with token trees, timed forwards and an AR cell (the tree_size table)"
    columns = min(len(panels), 2)
    fig, axes = _figure(data, ncols=columns, nrows=-(-len(panels) // columns))
    for ax, (_, rows) in zip(axes.flat, panels):
        curve = rows[rows["kind"] == "predicted"]
        ax.plot(curve["nodes"], curve[col.SPEEDUP], color="0.45", linestyle=(0, (1, 1)), label="predicted, best tree of N")
        for i, (kind, cell) in enumerate(rows[rows["kind"] != "predicted"].groupby("kind", sort=False)):
            error = [cell[col.SPEEDUP] - cell[f"{col.SPEEDUP}_ci_low"], cell[f"{col.SPEEDUP}_ci_high"] - cell[col.SPEEDUP]]
            ax.errorbar(cell["nodes"], cell[col.SPEEDUP], yerr=np.abs(error), fmt=MARKERS[i % len(MARKERS)],
                        color=PALETTE[(i + 1) % len(PALETTE)], capsize=3, label=f"{kind} (measured)")
        ax.axhline(1.0, color="0.4", linewidth=0.8)
        ax.set(xlabel="draft nodes verified per step N", ylabel="speedup over AR (tokens/s ratio)", title=rows["label"].iloc[0])
        ax.legend(fontsize="small")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Speedup against tree size (bars: 95 % CI; dotted: the tree theory)")
    return fig


def speedup_vs_load(data: PlotData) -> plt.Figure | str:
    """Speedup with its CI band along batch size and request rate, a line at 1.0 and each
    series' break-even point (`specdec.report.sweeps`)."""
    panels = [(axis, list(sweeps.series(data.summary, axis))) for axis in sweeps.AXES]
    panels = [(axis, found) for axis, found in panels if found]
    if not panels:
        return "no drafting series sweeps batch size or request rate"
    fig, axes = _figure(data, ncols=len(panels))
    for ax, (axis, found) in zip(axes[0], panels):
        for i, (label, rows) in enumerate(found):
            metric = sweeps.axis_metric(axis, rows)
            rows = rows.dropna(subset=[metric])
            color = data.colors.get(rows[col.METHOD_LABEL].iloc[0], PALETTE[i % len(PALETTE)])
            style = dict(color=color, linestyle=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)])
            ax.plot(rows[axis], rows[metric], label=label, **style)
            ax.fill_between(rows[axis], rows[f"{metric}_ci_low"], rows[f"{metric}_ci_high"], color=color, alpha=0.15, linewidth=0)
            _, value = sweeps.crossing(rows[axis], rows[metric], log_x=axis == col.BATCH_SIZE)
            if not np.isnan(value):
                ax.plot([value], [1.0], marker="|", markersize=14, color=color)
        ax.axhline(1.0, color="0.4", linewidth=0.8)
        if axis == col.BATCH_SIZE:
            _batch_size_axis(ax, [x for _, rows in found for x in rows[axis]])
            ax.set(xlabel="batch size", ylabel="speedup over AR (tokens/s ratio)", title="Speedup vs batch size")
        else:
            ax.set(xlabel="offered request rate (req/s)", ylabel="speedup over AR (E2E latency ratio)", title="Speedup vs request rate")
        ax.legend(fontsize="small")
    fig.suptitle("Where speculation stops paying (band: 95 % CI; tick: break-even)")
    return fig


def speedup_waterfall(data: PlotData) -> plt.Figure | str:
    """From the speedup α promises to the measured one, a step per cost (`specdec.report.theory`): a
    bar per drafting cell, named, coloured and hatched as its series elsewhere."""
    steps = list(theory.WATERFALL)
    frame = data.ok_runs.dropna(subset=steps)
    if frame.empty:
        return "no drafting run with timed forwards and an AR run to compare with"
    cells = data.with_settings(frame.groupby(col.CELL_NAME, sort=True)[steps].median().reset_index())
    cells = cells.assign(series=series_labels(cells)).sort_values("series")
    styles = _styles(data, cells, cells["series"])
    summary = data.summary.set_index(col.CELL)
    fig, axes = _figure(data)
    fig.set_figwidth(fig.get_figwidth() * 1.55)  # the legend beside keeps the panel a plain figure's width
    ax = axes[0, 0]
    labels = [*theory.WATERFALL.values(), "measured"]
    width = 0.8 / len(cells)
    for i, row in enumerate(cells.itertuples()):
        values = [*(getattr(row, step) for step in steps), summary[col.SPEEDUP].get(row.cell_name, np.nan)]
        x = np.arange(len(labels)) + (i - (len(cells) - 1) / 2) * width
        style = styles[row.series]
        ax.bar(x, values, width=width, color=style["color"], hatch=HATCHES[style["linestyle"]], edgecolor="white",
               label=row.series)
        predicted = summary[col.PREDICTED_SPEEDUP].get(row.cell_name)
        if not pd.isna(predicted):
            ax.plot([x[-1]], [predicted], marker="x", color="black")
    ax.plot([], [], marker="x", linestyle="", color="black", label=PREDICTION.label)
    ax.axhline(1.0, color="0.4", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(ylabel="speedup over AR")
    _legend_beside(fig, "Measured against predicted speedup, cost by cost")
    return fig


def acceptance_per_position(data: PlotData) -> plt.Figure | str:
    if data.positions.empty:
        return "no run recorded per-position acceptance (no speculative runs)"
    pooled = data.positions.groupby([col.CELL_NAME, col.POSITION], as_index=False)[[col.DRAFTED, col.ACCEPTED]].sum()
    frame = data.with_settings(pooled.assign(rate=pooled[col.ACCEPTED] / pooled[col.DRAFTED]))
    fig, axes = _figure(data)
    ax = axes[0, 0]
    labels = series_labels(frame)
    styles = _styles(data, frame, labels)
    for label, group in frame.assign(_series=labels).groupby("_series"):
        ax.plot(group[col.POSITION], group["rate"], label=label, **styles[label])
    ax.set(
        xlabel="draft position",
        ylabel="acceptance rate (accepted / drafted)",
        ylim=(0, 1.02),
        title="Acceptance per draft position (repeats pooled)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    return fig


def accepted_steps(data: PlotData) -> pd.DataFrame:
    """Per drafting cell, repeats pooled: the drafts that kept exactly k tokens (`steps`,
    from the runs table's `accepted_per_step`) and their share of the cell's drafts."""
    runs = data.ok_runs.dropna(subset=[col.ACCEPTED_PER_STEP])
    rows = [
        {col.CELL_NAME: name, col.ACCEPTED: k, "steps": int(count)}
        for name, text in zip(runs[col.CELL_NAME], runs[col.ACCEPTED_PER_STEP])
        for k, count in enumerate(str(text).split())
    ]
    frame = pd.DataFrame(rows, columns=[col.CELL_NAME, col.ACCEPTED, "steps"])
    frame = frame.groupby([col.CELL_NAME, col.ACCEPTED], as_index=False)["steps"].sum()
    return frame.assign(share=frame["steps"] / frame.groupby(col.CELL_NAME)["steps"].transform("sum"))


def accepted_per_step(data: PlotData) -> plt.Figure | str:
    """vLLM's histogram of accepted tokens per draft, as shares of a cell's drafts."""
    frame = accepted_steps(data)
    frame = frame[frame.groupby(col.CELL_NAME)["steps"].transform("sum") > 0]
    if frame.empty:
        return "no run counted its drafts by tokens kept (no drafting runs, or none with per-position counts)"
    cells = data.with_settings(frame[[col.CELL_NAME]].drop_duplicates())
    label_of = dict(zip(cells[col.CELL_NAME], series_labels(cells)))
    styles = _styles(data, cells, pd.Series(label_of.values()))
    fig, axes = _figure(data)
    ax = axes[0, 0]
    width = 0.8 / len(label_of)
    for i, (name, rows) in enumerate(frame.groupby(col.CELL_NAME, sort=True)):
        label = label_of[name]
        ax.bar(rows[col.ACCEPTED] + (i - (len(label_of) - 1) / 2) * width, rows["share"], width, label=label,
               color=styles[label]["color"], hatch=HATCHES[styles[label]["linestyle"]], edgecolor="white")
    ax.set(xlabel="draft tokens accepted in one step", ylabel="share of drafting steps")
    ax.set_xticks(range(int(frame[col.ACCEPTED].max()) + 1))
    _legend_beside(fig, "Accepted tokens per step (repeats pooled)")
    return fig


def latency_cdf(data: PlotData) -> plt.Figure | str:
    cells = data.ok_runs.drop_duplicates(col.CELL_NAME)
    labels = series_labels(cells)
    styles = _styles(data, cells, labels)
    # Latencies per request (TTFT, E2E) and per emission gap (ITL), repeats pooled.
    pooled = {
        label: {
            "TTFT": data.requests.loc[data.requests[col.CELL_NAME] == name, col.TTFT_S],
            "ITL": data.itl.loc[data.itl[col.CELL_NAME] == name, col.ITL_S],
            "E2E": data.requests.loc[data.requests[col.CELL_NAME] == name, col.E2E_S],
        }
        for name, label in zip(cells[col.CELL_NAME], labels)
        if (data.requests[col.CELL_NAME] == name).any()
    }
    if not pooled:
        return "no measured requests of a successful run in requests.csv"
    fig, axes = _figure(data, ncols=3, sharey=True)
    for ax, metric in zip(axes[0], ("TTFT", "ITL", "E2E")):
        for label, latencies in sorted(pooled.items()):
            values = np.sort(np.asarray(latencies[metric]) * 1000)
            if values.size:
                style = {k: v for k, v in styles[label].items() if k != "marker"}
                ax.step(
                    values,
                    np.arange(1, values.size + 1) / values.size,
                    where="post",
                    label=label,
                    **style,
                )
        ax.set(xlabel=f"{metric} (ms)", title=metric)
        if data.options["cdf_log_x"]:
            _log_time_axis(ax, [v for latencies in pooled.values() for v in np.asarray(latencies[metric]) * 1000])
    axes[0, 0].set_ylabel("fraction of requests")
    # Beside the panels, not under them: the run's footer goes under everything.
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper")
    fig.suptitle("Latency distributions (repeats pooled)")
    return fig


def throughput_vs_batch(data: PlotData) -> plt.Figure | str:
    frame = data.summary[data.summary[col.LOAD] == "closed"].dropna(subset=[col.THROUGHPUT_TOK_S])
    if frame.empty:
        return "no successful closed-loop runs"
    fig, axes = _figure(data)
    ax = axes[0, 0]
    _along(data, ax, frame, col.BATCH_SIZE, col.THROUGHPUT_TOK_S, "output tokens/s")
    ax.set_title("Throughput vs batch size" if swept(frame, col.BATCH_SIZE) else "Throughput per cell")
    return fig


def latency_vs_rate(data: PlotData) -> plt.Figure | str:
    frame = data.summary[data.summary[col.LOAD_MODE] == "open"].dropna(subset=[col.LOAD_RATE])
    if frame.empty:
        return "no open-loop (request-rate) runs in this experiment"
    fig, axes = _figure(data, ncols=2)
    for i, (ax, metric) in enumerate(zip(axes[0], (col.TTFT_S, col.E2E_S))):
        name = metric.split("_")[0].upper()
        p99 = Overlay(f"{metric}_p99", "p99", dict(linestyle="--", markerfacecolor="white"), marker="d")
        _along(data, ax, frame, col.LOAD_RATE, f"{metric}_p50", f"{name} (ms)", exclude=(col.LOAD,), scale=1000,
               overlays=(p99,), legend=i == 0)
        ax.set_title(f"{name}: p50 and p99")
    fig.suptitle("Latency under open-loop load")
    return fig


def energy_per_token(data: PlotData) -> plt.Figure | str:
    frame = data.summary.dropna(subset=[col.ENERGY_J_PER_TOKEN])
    if frame.empty:
        reasons = sorted(set(data.runs.get(col.ENERGY_REASON, pd.Series()).dropna()))
        return "energy not measured" + (f": {'; '.join(reasons)}" if reasons else "")
    frame = frame.assign(_series=series_labels(frame)).sort_values("_series")
    fig, axes = _figure(data)
    ax = axes[0, 0]
    ax.barh(
        frame["_series"],
        frame[col.ENERGY_J_PER_TOKEN],
        xerr=_errors(frame, col.ENERGY_J_PER_TOKEN),
        color=[data.colors[m] for m in frame[col.METHOD_LABEL]],
        capsize=3,
    )
    ax.invert_yaxis()
    ax.set(xlabel="energy per output token (J)", title="Energy per token (median over repeats)")
    return fig


def energy_vs_speedup(data: PlotData) -> plt.Figure | str:
    """Energy per output token against the speedup over AR, a point per cell (γ and batch
    size written beside it); a cell without measured energy has no point, never one at 0,
    and is named under the panel."""
    frame = data.summary.dropna(subset=[col.SPEEDUP])
    measured = frame.dropna(subset=[col.ENERGY_J_PER_TOKEN])
    if measured.empty:
        reasons = sorted(set(data.runs.get(col.ENERGY_REASON, pd.Series()).dropna()))
        return "no cell with a speedup measured energy" + (f": {'; '.join(reasons)}" if reasons else "")
    fig, axes = _figure(data)
    ax = axes[0, 0]
    labels = series_labels(measured, exclude=(col.GAMMA, col.BATCH_SIZE))
    styles = _styles(data, measured, labels)
    for label, rows in measured.assign(_series=labels).groupby("_series", sort=True):
        ax.errorbar(rows[col.SPEEDUP], rows[col.ENERGY_J_PER_TOKEN], xerr=_errors(rows, col.SPEEDUP),
                    yerr=_errors(rows, col.ENERGY_J_PER_TOKEN), linestyle="", capsize=3, label=label,
                    **{k: v for k, v in styles[label].items() if k != "linestyle"})
        for row in rows.itertuples():
            text = f"b{plain(row.batch_size)}" + (f" γ{plain(row.gamma)}" if row.gamma else "")
            ax.annotate(text, (row.speedup, row.energy_j_per_token), xytext=(4, 4), textcoords="offset points",
                        fontsize="x-small", color="0.3")
    ax.axvline(1.0, color="0.4", linewidth=0.8)
    ax.margins(x=0.15, y=0.1)  # room for the labels beside the points
    ax.set(xlabel="speedup over AR (tokens/s ratio)", ylabel="energy per output token (J)")
    missing = len(frame) - len(measured)
    if missing:
        ax.set_title(f"{missing} of {len(frame)} cells measured no energy: not drawn", fontsize="small", color="0.35")
    _legend_beside(fig, "Energy against speedup (median over repeats, 95 % CI)")
    return fig


CATEGORY_PANELS = {
    col.SPEEDUP: "speedup over AR (paired requests)",
    col.ACCEPTANCE_RATE: "acceptance rate (accepted / drafted)",
    col.MEAN_ACCEPTED_LENGTH: "mean accepted length (tokens / forward)",
}


def by_category(data: PlotData) -> plt.Figure | str:
    """Speedup, acceptance and mean accepted length per prompt category (the `categories`
    table), a bar per drafting cell labelled with the requests behind it."""
    frame = data.categories
    if frame.empty:
        return "no drafting cell measured requests (no speculative runs in requests.csv)"
    cells = data.with_settings(frame[[col.CELL]].drop_duplicates().rename(columns={col.CELL: col.CELL_NAME}))
    label_of = dict(zip(cells[col.CELL_NAME], series_labels(cells)))
    styles = _styles(data, cells, pd.Series(label_of.values()))
    categories = sorted(frame[col.CATEGORY].unique())
    fig, axes = _figure(data, ncols=len(CATEGORY_PANELS))
    width = 0.8 / len(label_of)
    for ax, (metric, ylabel) in zip(axes[0], CATEGORY_PANELS.items()):
        for i, (name, rows) in enumerate(frame.groupby(col.CELL, sort=True)):
            rows = rows.set_index(col.CATEGORY).reindex(categories)
            label = label_of[name]
            bars = ax.bar(np.arange(len(categories)) + (i - (len(label_of) - 1) / 2) * width, rows[metric], width,
                          label=label, color=styles[label]["color"], hatch=HATCHES[styles[label]["linestyle"]],
                          edgecolor="white")
            counts = rows[col.SPEEDUP_REQUESTS if metric == col.SPEEDUP else col.N_REQUESTS]
            ax.bar_label(bars, ["" if pd.isna(v) else f"{int(n)}" for v, n in zip(rows[metric], counts)],
                         fontsize="xx-small", color="0.35", padding=1)
        ax.set_xticks(np.arange(len(categories)), categories)
        ax.set(ylabel=ylabel)
        ax.margins(y=0.1)  # room for the request counts above the tallest bar
    axes[0, 0].axhline(1.0, color="0.4", linewidth=0.8)
    axes[0, 1].set_ylim(0, 1.1)
    _legend_beside(fig, "Results by prompt category (repeats pooled; over each bar: the requests behind it)")
    return fig


def power_timeline(data: PlotData) -> plt.Figure | str:
    # The first repeat of each cell that sampled power.
    runs = data.power.sort_values(col.REPEAT, kind="stable").drop_duplicates(col.CELL_NAME)
    runs = runs.head(data.options["max_power_panels"])
    if runs.empty:
        return "no power samples in power.csv (power was not sampled)"
    fig, axes = _figure(data, nrows=len(runs), sharex=False)
    for ax, run in zip(axes[:, 0], runs.itertuples()):
        power = data.power[data.power[col.CELL] == run.cell]
        for i, (device, frame) in enumerate(power.groupby("device")):
            ax.plot(frame["t_s"], frame["power_w"], label=f"power_w {device}", color=PALETTE[(i + 4) % len(PALETTE)])
        window = power.loc[power["phase"] == "window", "t_s"]
        if len(window):
            ax.axvspan(window.min(), window.max(), color="0.85", zorder=0, label="measured window")
        ax.set(ylabel="power (W)", title=f"{run.cell_name} (repeat {run.repeat})")
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("time from window start (s)")
    return fig


FIGURES: dict[str, Callable[[PlotData], plt.Figure | str]] = {
    "speedup_vs_gamma": speedup_vs_gamma,
    "speedup_vs_load": speedup_vs_load,
    "speedup_waterfall": speedup_waterfall,
    "speedup_vs_tree_size": speedup_vs_tree_size,
    "acceptance_per_position": acceptance_per_position,
    "accepted_per_step": accepted_per_step,
    "latency_cdf": latency_cdf,
    "throughput_vs_batch": throughput_vs_batch,
    "latency_vs_rate": latency_vs_rate,
    "energy_per_token": energy_per_token,
    "energy_vs_speedup": energy_vs_speedup,
    "by_category": by_category,
    "power_timeline": power_timeline,
}


def _rc(options: dict) -> dict:
    return {
        "font.size": options["font_size"],
        "axes.titlesize": "medium",
        "axes.spines.top": False,
        "axes.axisbelow": True,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "0.9",
        "grid.linewidth": 0.6,
        "legend.fontsize": "small",
        "legend.frameon": False,
        "lines.linewidth": 1.6,
        "lines.markersize": 5,
        "svg.fonttype": "none",
        # Laid out at the resolution it is saved at: text extents, and so the layout that
        # the footer is placed under, change with the resolution.
        "figure.dpi": options["dpi"],
        "savefig.dpi": options["dpi"],
    }


def _add_footer(fig: plt.Figure, text: str) -> None:
    """What was run, in small print under everything drawn: the union of every visible
    artist's extent, figure legends and texts included (a figure legend placed `outside` by
    the layout is not always inside `fig.get_tightbbox()`), then the layout is frozen so
    that saving cannot move anything back over the footer."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    extents = [
        artist.get_tightbbox(renderer)
        for artist in (*fig.axes, *fig.legends, *fig.texts)
        if artist.get_visible()
    ]
    bottom = min(box.y0 for box in extents if box is not None and box.height > 0)
    left = min(box.x0 for box in extents if box is not None and box.width > 0)
    fig.set_layout_engine("none")
    pad = 4 * fig.dpi / 72  # 4 points
    fig.text(left / fig.bbox.width, (bottom - pad) / fig.bbox.height, text, fontsize="x-small", color="0.45", va="top")


LEFT_OUT = "left_out.html"


def make_figures(
    tables: Mapping[str, str | Path], out_dir: str | Path, options: dict | None = None
) -> list[Path]:
    """Draw each figure of `FIGURES` that has data as `out_dir/{name}/{name}.png` and `.svg`
    from the CSV file of each name in `TABLES` (the folder of one without stays empty), and
    name those left out in `out_dir/left_out.html`; return the paths written."""
    data = PlotData.read(tables, options)
    out_dir = Path(out_dir)
    written, left_out = [], {}
    with plt.rc_context(_rc(data.options)):
        for name, build in FIGURES.items():
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            fig = build(data)
            if isinstance(fig, str):
                left_out[name] = fig
                continue
            _add_footer(fig, data.footer)
            for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
                path = out_dir / name / f"{name}.{fmt}"
                with atomic_open(path, "wb") as handle:
                    fig.savefig(handle, format=fmt, bbox_inches="tight", metadata=metadata)
                written.append(path)
            plt.close(fig)
    return [*written, write_left_out(left_out, out_dir / LEFT_OUT)]


def write_left_out(reasons: Mapping[str, str], path: Path) -> Path:
    """An HTML fragment for the report's first page: each figure left out and why, one line
    each (empty where every figure was drawn)."""
    items = "".join(f"<li>{name.replace('_', ' ')}: {html.escape(reason)}</li>" for name, reason in reasons.items())
    body = f"<p>Figures left out, having nothing to show:</p><ul>{items}</ul>" if reasons else ""
    with atomic_open(path) as handle:
        handle.write(f"<div class='specdec-headline'><meta charset='utf-8'>{body}</div>\n")
    return path
