"""The end-of-job console summary of a cell: its `metrics` block as a text table."""

from __future__ import annotations

from io import StringIO

from rich.console import Console
from rich.table import Table

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
