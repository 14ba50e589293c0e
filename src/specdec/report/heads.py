"""What training a head bought: each trained head's training (text, tokens, wall time,
parameters) beside what its cells measured (cost ratio c, acceptance, tau, speedup), the
generated tokens after which its training time is paid back at that speedup, and the
training curves (held-out acceptance and loss against training tokens)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from specdec.io import atomic_open  # noqa: E402
from specdec.job.leviathan import expected_tokens_per_step  # noqa: E402
from specdec.report import columns as col  # noqa: E402
from specdec.report.tables import write_table  # noqa: E402

FIGURE = "training_curve"
COLUMNS = {
    "head": "head", "kind": "kind", col.DATASET: "dataset", col.ENGINE: "engine", col.GAMMA: "γ",
    "training_text": "trained on", "training_tokens": "training tokens", "training_s": "training time (s)",
    "parameters": "parameters trained", "held_out_acceptance": "held-out acceptance (position 1)",
    col.THEORY_COST_RATIO: "cost ratio c", "needed_alpha": "α it needs to pay", "alpha": "α measured",
    col.ACCEPTANCE_RATE: "acceptance", col.MEAN_ACCEPTED_LENGTH: "τ (tokens per step)",
    col.SPEEDUP: "speedup", "payback_tokens": "tokens to pay back the training",
}


def payback_tokens(training_s: float, throughput_tok_s: float, speedup: float) -> float:
    """Generated tokens after which `training_s` is saved back, at `throughput_tok_s` with the
    head and `speedup` over AR (inf where it does not pay: speedup <= 1)."""
    if not (speedup > 1 and throughput_tok_s > 0):
        return math.inf
    saved_per_token = speedup / throughput_tok_s - 1 / throughput_tok_s  # AR's seconds per token, less the head's
    return training_s / saved_per_token


def alpha_to_pay(c: float, verify_cost: float, gamma: int) -> float:
    """The per-token acceptance alpha above which drafting gamma tokens at cost ratio `c`,
    verified at `verify_cost` (both in target steps), pays (Leviathan et al.); 1 where none does."""
    if not (c >= 0 and verify_cost > 0 and gamma >= 1):
        return math.nan
    pays = [a for a in np.linspace(0.0, 0.999, 1000) if expected_tokens_per_step(a, gamma) > gamma * c + verify_cost]
    return float(pays[0]) if pays else 1.0


def heads_table(trainings: Mapping[str, dict], summary: pd.DataFrame, runs: pd.DataFrame,
                heads: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per summary row that drafts with a trained head (`trainings`: head name, the
    drafter that trains it -> its training.json record; `heads`: drafter name -> the head it
    drafts with where that is another drafter's, `drafters.NAME.head`); `runs` gives each
    cell's alpha and verification cost."""
    head_of = {name: name for name in trainings} | dict(heads or {})
    rows = []
    for _, row in summary[summary[col.DRAFTER].isin([d for d, h in head_of.items() if h in trainings])].iterrows():
        record = trainings[head_of[row[col.DRAFTER]]]
        own = runs[(runs[col.GROUP_ID] == row[col.GROUP_ID]) & (runs[col.STATUS] == "ok")]
        verify, alpha = (own[name].median() if name in own else math.nan for name in ("theory_verify_cost_ratio", "theory_alpha"))
        first = record["curve"][-1]["acceptance"][0] if record["curve"][-1]["acceptance"] else None
        rows.append({
            "head": row[col.DRAFTER], "kind": record["kind"], col.DATASET: row[col.DATASET], col.ENGINE: row[col.ENGINE],
            col.GAMMA: row[col.GAMMA], "training_text": ", ".join(record["corpus"]["sources"]),
            "training_tokens": record["tokens"], "training_s": record["seconds"], "parameters": record["parameters"],
            "held_out_acceptance": first, col.THEORY_COST_RATIO: row.get(col.THEORY_COST_RATIO),
            "needed_alpha": alpha_to_pay(row.get(col.THEORY_COST_RATIO, math.nan), verify, int(row[col.GAMMA])), "alpha": alpha,
            col.ACCEPTANCE_RATE: row.get(col.ACCEPTANCE_RATE), col.MEAN_ACCEPTED_LENGTH: row.get(col.MEAN_ACCEPTED_LENGTH),
            col.SPEEDUP: row.get(col.SPEEDUP),
            # only a speedup whose interval lies above 1 pays anything back
            "payback_tokens": payback_tokens(record["seconds"], row.get(col.THROUGHPUT_TOK_S, math.nan),
                                             row.get(col.SPEEDUP, math.nan) if row.get(f"{col.SPEEDUP}_ci_low", 0) > 1 else 1.0),
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def display(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.copy()
    shown["payback_tokens"] = [("never (not faster than AR)" if math.isinf(v) else f"{v:,.0f}") if pd.notna(v) else None
                               for v in shown["payback_tokens"]]
    for column in ("held_out_acceptance", col.THEORY_COST_RATIO, "needed_alpha", "alpha", col.ACCEPTANCE_RATE,
                   col.MEAN_ACCEPTED_LENGTH, col.SPEEDUP):
        shown[column] = [f"{v:.3g}" if pd.notna(v) else None for v in shown[column]]
    return shown.rename(columns=COLUMNS)


def curve_figure(trainings: Mapping[str, dict]) -> plt.Figure:
    """Held-out acceptance per draft position (left) and held-out loss (right) against the
    training tokens, one colour per head."""
    fig, (accept, loss) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for i, (name, record) in enumerate(sorted(trainings.items())):
        tokens = [point["tokens"] for point in record["curve"]]
        colour = f"C{i}"
        positions = max(len(point["acceptance"]) for point in record["curve"])
        for k in range(positions):
            values = [point["acceptance"][k] if k < len(point["acceptance"]) else None for point in record["curve"]]
            accept.plot(tokens, values, color=colour, alpha=1.0 - 0.3 * k, marker="o", markersize=3,
                        linestyle="-" if k == 0 else ":", label=f"{name} ({record['kind']})" if k == 0 else None)
        loss.plot(tokens, [point["held_out_loss"] for point in record["curve"]], color=colour, marker="o", markersize=3)
    accept.set(xlabel="training tokens", ylabel="held-out acceptance", title="acceptance (solid: position 1; dotted: later)")
    loss.set(xlabel="training tokens", ylabel="held-out loss", title="loss")
    accept.legend(loc="best", fontsize="small", frameon=False)
    return fig


def write_heads(trainings: Mapping[str, dict], summary: pd.DataFrame, runs: pd.DataFrame, stem: str | Path,
                figure_dir: str | Path, experiment: str, heads: Mapping[str, str] | None = None) -> list[Path]:
    """The table (`stem`.csv, .md, .html) and the curve figure (`figure_dir`/training_curve.png, .svg)."""
    table = heads_table(trainings, summary, runs, heads)
    note = ("Heads the pipeline trained for this experiment's target (self-distilled on text that shares no prompt with "
            "its datasets), beside what their cells measured. α it needs to pay: the per-token acceptance above which "
            "drafting γ tokens at the measured c and verification cost beats AR (Leviathan et al.); α measured: the "
            "cell's. Payback: generated tokens at the measured throughput "
            "after which the time saved equals the training time, where the speedup's interval lies above 1.")
    written = write_table(table, stem, f"{experiment}: what training a head bought", display(table), note,
                          empty="No cell drafted with a trained head.")
    figure_dir = Path(figure_dir)
    figure_dir.mkdir(parents=True, exist_ok=True)
    fig = curve_figure(trainings)
    for fmt in ("png", "svg"):
        with atomic_open(figure_dir / f"{FIGURE}.{fmt}", "wb") as handle:
            fig.savefig(handle, format=fmt, bbox_inches="tight")
        written.append(figure_dir / f"{FIGURE}.{fmt}")
    plt.close(fig)
    return written
