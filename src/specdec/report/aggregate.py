"""Reads one experiment's result files through the record contract into tidy tables and
writes all of them (`aggregate_experiment`); never loads a model.

Every `result.json` is read with `records.read_result` (the writer's schema) and its typed
cell is flattened into columns. Beside the runs table, the per-request, per-emission-gap,
per-draft-position and power tables hold what the figures draw, so that `specdec.report.figures`
reads only declared tables. Statistics are `specdec.report.summary`'s, rendering `specdec.report.tables`'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from specdec.engines import REFERENCE, engine_class
from specdec.gate.cells import Cell, Load
from specdec.job import cotenants
from specdec.job.metrics import e2e, emission_gaps, measured, queueing_delay, request_tokens_per_s, tpot, ttft
from specdec.records import INTERLEAVED_REQUESTS, POWER_KEYS, POWER_SAMPLES, read_power_samples, read_requests, read_result
from specdec.report import columns as col
from specdec.report import sweeps, theory
from specdec.report.goodput import Slo, run_goodput
from specdec.report.summary import DEFAULT_SETTINGS, category_table, merge_settings, summary_table
from specdec.report.tables import DASH, display_categories, display_summary, write_csv, write_headline, write_table
from specdec.result import Attribution, Cotenants, Energy, Metrics, Result, Status

DIST_METRICS = (col.TTFT_S, col.TPOT_S, col.ITL_S, "itl_token_s", col.E2E_S, "queue_s", "request_tok_s")
DIST_FIELDS = ("mean", "p50", "p90", "p99", "count")
# A run in the per-run tables below; `cell` joins them with the runs table.
RUN_KEYS = (col.CELL, col.CELL_NAME, col.REPEAT)
REQUEST_COUNTS = (col.DRAFTED_TOKENS, col.ACCEPTED_TOKENS, col.TARGET_FORWARDS)
REQUEST_FIELDS = (col.REQUEST_ID, "prompt_id", col.CATEGORY, "turn", "prompt_tokens", col.OUTPUT_TOKENS)
REQUEST_COLUMNS = (
    *RUN_KEYS,
    *REQUEST_FIELDS,
    col.TTFT_S,
    col.TPOT_S,
    col.E2E_S,
    "queue_s",
    "request_tok_s",
    *REQUEST_COUNTS,
)
ITL_COLUMNS = (*RUN_KEYS, col.REQUEST_ID, col.ITL_S)
POSITION_COLUMNS = (*RUN_KEYS, col.POSITION, col.DRAFTED, col.ACCEPTED, "rate", "rate_per_draft")
POWER_COLUMNS = (*RUN_KEYS, *POWER_KEYS)
STATUS_COLUMNS = (col.EXPERIMENT, col.CELL, col.STATUS, "failure_type", "failure_message", "failure_phase")


# Names the AR reference an interleaved cell measured in its own job (its run and group).
INTERLEAVED_AR = "interleaved AR"


def interleaved_group_id(cell: Cell) -> str:
    """The group of an interleaved cell's own AR reference: its `ar_group_id`."""
    return f"{cell.group_id} ({INTERLEAVED_AR})"


class ExperimentError(ValueError):
    """Result files that do not make one experiment's tables: none, or another experiment's."""


@dataclass(frozen=True)
class Run:
    """One validated result file."""

    path: Path
    result: Result

    @property
    def cell(self) -> Cell:
        return self.result.config

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def keys(self) -> dict[str, Any]:
        return {col.CELL: self.cell.name, col.CELL_NAME: self.cell.group, col.REPEAT: self.cell.repeat}

    def beside(self, name: str) -> Path:
        return self.path.parent / name


def read_runs(paths: Iterable[str | Path]) -> list[Run]:
    runs = [Run(Path(path), read_result(path)) for path in paths]
    if not runs:
        raise ExperimentError("no result files given to aggregate")
    return runs


# --- the runs table ------------------------------------------------------------------------


def load_label(load: Load) -> str:
    """A short name for a load setting, e.g. `closed` or `open 2.0/s poisson`; the cell's
    name tells apart loads that differ in size (`num_requests`, `duration_s`)."""
    if not load.is_open:
        return "closed"
    parts = [f"open {load.rate}/s", load.arrival]
    if load.arrival == "gamma":
        parts.append(f"cv{load.burstiness}")
    return " ".join(parts)


def method_label(cell: Cell) -> str:
    """`method (drafter)` after the engine's label (`engine: ` for an engine other than ours); a replay drafter's
    cell is `replay (measurement tool: drafter)`, so that nobody reads it as a method."""
    if cell.drafter is not None and cell.drafter.measurement_tool:
        return f"replay (measurement tool: {cell.drafter.name})"
    label = f"{cell.method} ({cell.drafter.name})" if cell.drafter else cell.method
    return engine_class(cell.engine).label + label


def cell_columns(cell: Cell) -> dict[str, Any]:
    """The typed cell as flat columns; `gamma` is 0 for AR, `drafter` its name or None."""
    placement = cell.placement
    return {
        col.EXPERIMENT: cell.experiment,
        col.CELL: cell.name,
        col.CELL_NAME: cell.group,
        col.CELL_ID: cell.id,
        col.GROUP_ID: cell.group_id,
        col.AR_GROUP_ID: interleaved_group_id(cell) if cell.interleaved else cell.ar_counterpart().group_id,
        col.SPECDEC_AR_GROUP_ID: (interleaved_group_id(cell) if cell.interleaved and engine_class(cell.engine).parity_reference
                                else cell.ar_counterpart(engine=REFERENCE).group_id),
        col.REFERENCE: cell.reference,
        col.DATASET: cell.dataset,
        col.TARGET: cell.target.name,
        col.ENGINE: cell.engine,
        col.METHOD: cell.method,
        col.METHOD_LABEL: method_label(cell),
        col.DRAFTER: cell.drafter.name if cell.drafter else None,
        col.MEASUREMENT_TOOL: bool(cell.drafter and cell.drafter.measurement_tool),
        col.GAMMA: cell.gamma,
        col.BATCH_SIZE: cell.batch_size,
        **asdict(cell.generation),
        col.REPEAT: cell.repeat,
        col.SEED: cell.seed,
        "warmup": cell.warmup,
        col.PLACEMENT_STRATEGY: placement.strategy,
        # GPUs of the target x the drafter
        "placement_ratio": "{}x{}".format(*placement.ratio) if placement.ratio else None,
        "placement_gpus": placement.gpus,
        "placement_max_memory_fraction": placement.max_memory_fraction,
        col.LOAD: load_label(cell.load),
        **{f"load_{key}": value for key, value in asdict(cell.load).items()},
    }


def flatten_result(run: Run) -> dict[str, Any]:
    """One tidy row: the cell's columns, DIST fields as `{metric}_{field}`, acceptance,
    theory, energy, memory, correctness, failure and `meta_*`."""
    result = run.result
    row: dict[str, Any] = {"path": str(run.path), col.STATUS: result.status.value, **cell_columns(run.cell)}
    row.update(_metric_fields(result.metrics))
    acceptance = result.acceptance
    row.update({key: getattr(acceptance, key, None) for key in (*REQUEST_COUNTS, col.ACCEPTANCE_RATE, col.MEAN_ACCEPTED_LENGTH,
                                                                 "num_drafts", col.MEAN_ACCEPTANCE_LENGTH)})
    row[col.NODES_PER_DRAFT] = acceptance.nodes_verified if acceptance else None
    # drafts keeping 0, 1, .. gamma tokens, as text so that the tidy table stays flat
    row[col.ACCEPTED_PER_STEP] = " ".join(map(str, acceptance.accepted_per_step if acceptance else ())) or None
    row.update({f"theory_{key}": getattr(result.theory, key, None) for key in ("alpha", "longest_draft")})
    row.update(_attribution_fields(result.attribution))
    row.update(_cotenant_fields(result.cotenants))
    row.update(_energy_fields(result.energy, run.cell.interleaved))
    # What a kept draft token cost; missing (never 0 or infinite) without energy or drafts.
    accepted = row[col.ACCEPTED_TOKENS]
    row[col.ENERGY_J_PER_ACCEPTED_TOKEN] = row["energy_j"] / accepted if row["energy_j"] is not None and accepted else None
    row.update({f"memory_{key}": getattr(result.memory, key, None)
                for key in ("device", "weights_mb", "peak_mb", "peak_over_needed", "growth_over_needed")})
    for check in ("correctness", "parity"):  # greedy divergences: near-ties and defects (analysis)
        block = getattr(result, check)
        row.update({f"{check}_{key}": getattr(block, key) if block else None for key in ("identical", "status", "near_ties", "defects")})
    row["engine_version"] = result.engine.version
    row.update({f"failure_{key}": getattr(result.failure, key) if result.failure else None for key in ("type", "message", "phase")})
    row.update({f"meta_{key}": value for key, value in result.metadata.flat().items()})
    return row


def _metric_fields(metrics: Metrics | None) -> dict[str, Any]:
    """A `metrics` block as columns: DIST fields as `{metric}_{field}`."""
    return metrics.columns(DIST_FIELDS) if metrics else {}


ATTRIBUTION_PARTS = ("prefill", "drafter", "verify", "accept", "other")


def _attribution_fields(attribution: Attribution) -> dict[str, Any]:
    """Where the decode time went (seconds per part); missing where it was not split."""
    available = attribution.available
    return {
        "attribution_decode_s": attribution.decode_s if available else None,
        "attribution_steps": attribution.steps if available else None,
        **{f"attribution_{part}_s": attribution.parts_s.get(part) if available else None for part in ATTRIBUTION_PARTS},
    }


def _cotenant_fields(block: Cotenants | None) -> dict[str, Any]:
    """The machine's load from outside the cell during its window, and the summary's flag."""
    if block is None or not block.available:
        return {"cotenant_other_cpu_share": None, "cotenant_load_average_1m": None, "cotenant_gpu_processes": None,
                col.COTENANT_FLAG: None}
    gpu = block.gpu_processes
    return {
        "cotenant_other_cpu_share": block.other_cpu_share,
        "cotenant_load_average_1m": block.load_average_1m,
        "cotenant_gpu_processes": None if gpu is None else len(gpu),
        col.COTENANT_FLAG: cotenants.flag(block.data),
    }


INTERLEAVED_ENERGY = "interleaved: the window's energy is the method's and its AR reference's together (result.json energy.covers)"


def _energy_fields(energy: Energy, interleaved: bool = False) -> dict[str, Any]:
    """Energy stays missing (never 0) unless the run measured it, and the cell's own: an
    interleaved cell's window holds its AR reference's work too, which cannot be told apart."""
    available = energy.available and not interleaved
    return {
        "energy_available": available,
        "energy_method": energy.method,
        col.ENERGY_REASON: INTERLEAVED_ENERGY if energy.available and interleaved else energy.reason,
        "energy_j": energy.gross_j if available else None,
        col.ENERGY_J_PER_TOKEN: energy.gross_j_per_output_token if available else None,
    }


def runs_table(runs: Sequence[Run], requests: pd.DataFrame | None = None, slo: Slo | None = None) -> pd.DataFrame:
    """One row per result file (every status), with the theory that pairs each drafting run
    with its AR run, and goodput under `slo` from the measured `requests`."""
    predictions = theory.theory_columns([run.result for run in runs])
    table = pd.DataFrame([flatten_result(run) | prediction for run, prediction in zip(runs, predictions)])
    if requests is not None:
        goodput = run_goodput(requests, table.set_index(col.CELL)["window_s"] if "window_s" in table else pd.Series(dtype=float), slo)
        table = table.merge(goodput, on=col.CELL, how="left")
    return table.sort_values([col.EXPERIMENT, col.CELL], kind="stable").reset_index(drop=True)


def _status_table(runs: pd.DataFrame, status: Status) -> pd.DataFrame:
    """Runs of one status with the failure the runner recorded."""
    rows = runs.loc[runs[col.STATUS] == status.value, list(STATUS_COLUMNS)]
    return rows.rename(columns=lambda c: c.removeprefix("failure_")).reset_index(drop=True)


def failed_table(runs: pd.DataFrame) -> pd.DataFrame:
    return _status_table(runs, Status.FAILED)


def not_supported_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Cells the engine cannot run (e.g. transformers' assisted generation above batch 1)."""
    return _status_table(runs, Status.NOT_SUPPORTED)


RUN_INFO_FIELDS = {
    "meta_host": "host",
    "meta_devices": "devices",
    "meta_cpu": "CPU",
    "meta_cuda": "CUDA",
    "meta_driver": "driver",
    "meta_torch": "torch",
    "meta_transformers": "transformers",
    "meta_vllm": "vLLM",
    "meta_specdec": "specdec",
    "meta_git_commit": "git commit",
    col.TARGET: "targets",
    col.METHOD_LABEL: "methods",
    col.DATASET: "datasets",
    col.BATCH_SIZE: "batch sizes",
    col.LOAD: "loads",
    col.MAX_NEW_TOKENS: "max new tokens",
    col.TEMPERATURE: "temperatures",
    col.PLACEMENT_STRATEGY: "placements",
    "energy_method": "energy method",
    col.ENERGY_REASON: "energy unavailable because",
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


# --- per-run tables for the figures --------------------------------------------------------


def _request_row(keys: dict, record: dict) -> dict:
    return {
        **keys,
        **{key: record[key] for key in REQUEST_FIELDS},
        col.TTFT_S: ttft(record),
        col.TPOT_S: tpot(record),
        col.E2E_S: e2e(record),
        "queue_s": queueing_delay(record),
        "request_tok_s": request_tokens_per_s(record),
        **{key: record.get(key) for key in REQUEST_COUNTS},
    }


def request_tables(runs: Sequence[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every measured request of the ok runs (latencies as `specdec.job.metrics` defines them)
    and every gap between successive emissions of one (ITL)."""
    requests, gaps = [], []
    for run in runs:
        path = run.beside("requests.jsonl")
        # Only ok runs measured requests; one copied back without its requests.jsonl adds none.
        records = measured(read_requests(path)) if run.ok and path.is_file() else []
        for record in records:
            requests.append(_request_row(run.keys, record))
            gaps += [{**run.keys, col.REQUEST_ID: record[col.REQUEST_ID], col.ITL_S: gap} for gap in emission_gaps(record)]
    return pd.DataFrame(requests, columns=REQUEST_COLUMNS), pd.DataFrame(gaps, columns=ITL_COLUMNS)


def interleaved_tables(runs: Sequence[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The AR references that interleaved cells measured in their own jobs: runs-table rows
    (group `interleaved_group_id`, the cell's `ar_group_id`; no energy of their own) and their
    measured requests (`reference_requests.jsonl`), which `summary` pairs the cells with.
    They are not runs of the matrix, so they stay out of the runs and requests tables."""
    rows, requests = [], []
    for run in runs:
        if not (run.ok and run.cell.interleaved):
            continue
        keys = {col.CELL: f"{run.cell.name} ({INTERLEAVED_AR})", col.CELL_NAME: f"{run.cell.group} ({INTERLEAVED_AR})",
                col.REPEAT: run.cell.repeat}
        rows.append({**keys, col.STATUS: Status.OK.value, col.METHOD: "ar", col.GROUP_ID: interleaved_group_id(run.cell),
                     **_metric_fields(run.result.reference.metrics), col.ENERGY_J_PER_TOKEN: None})
        requests += [_request_row(keys, record) for record in measured(read_requests(run.beside(INTERLEAVED_REQUESTS)))]
    return pd.DataFrame(rows), pd.DataFrame(requests, columns=REQUEST_COLUMNS)


def positions_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Drafted and accepted tokens per draft position of each ok run (`acceptance.per_position`)."""
    rows = [
        {**run.keys, **entry.to_dict()}
        for run in runs
        if run.ok and run.result.acceptance
        for entry in run.result.acceptance.per_position
    ]
    return pd.DataFrame(rows, columns=POSITION_COLUMNS)


def power_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The power samples (`power.csv`) of each ok run that has them; headers only when none."""
    frames = [
        pd.DataFrame(read_power_samples(path), columns=POWER_KEYS).assign(**run.keys)
        for run in runs
        if run.ok and (path := run.beside(POWER_SAMPLES)).is_file()
    ]
    return pd.concat(frames, ignore_index=True)[list(POWER_COLUMNS)] if frames else pd.DataFrame(columns=POWER_COLUMNS)


# --- one experiment ------------------------------------------------------------------------


def aggregate_experiment(
    result_paths: Iterable[str | Path], out_dir: str | Path, experiment: str, slo: Slo | None = None, **settings: Any
) -> dict[str, list[Path]]:
    """Write every table of one experiment under `out_dir`: the headline (HTML fragment and
    Markdown), runs, summary, categories, break_even, capacity, gamma, trees, tree_size, failed, not_supported and
    run_info (CSV, Markdown, HTML); requests, itl, positions, tree_sizes and power (CSV). `slo` is the experiment's (goodput and capacity)."""
    settings = merge_settings(settings, DEFAULT_SETTINGS, "aggregate")
    out_dir = Path(out_dir)
    results = read_runs(result_paths)
    foreign = [run.path for run in results if run.cell.experiment != experiment]
    if foreign:
        raise ExperimentError(f"{foreign[0]}: not a result of experiment {experiment!r}")
    requests, itl = request_tables(results)
    runs = runs_table(results, requests, slo)
    interleaved = interleaved_tables(results)
    summary = summary_table(runs, requests, interleaved, **settings)
    break_even = sweeps.break_even_table(summary)
    tree_sizes, tree_size_points = theory.best_tree_table([run.result for run in results], summary)
    note = (
        f"Median over repeats with {settings['confidence']:.0%} bootstrap interval "
        f"[low, high] (with one repeat, ratios take theirs from a paired bootstrap over "
        f"requests); ratios against the matching AR cell, or the AR interleaved request by request in the "
        f"cell's own job (column reference); flags: repeats with coefficient "
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
        "categories": write_table(
            categories := category_table(runs, requests, interleaved),
            out_dir / "categories",
            f"{experiment}: results per prompt category",
            display_categories(categories),
            note="Per drafting cell and prompt category, repeats pooled: speedup = (Σ output "
            "tokens / Σ E2E) of the cell's requests over the same for the AR cell's same "
            "requests (paired by request: the AR run of the same repeat, or the cell's interleaved AR); acceptance = "
            "accepted / drafted tokens; mean accepted length = output tokens per target forward.",
            empty="No drafting cell measured requests.",
        ),
        "headline": write_headline(summary, break_even, out_dir / "headline", experiment),
        "break_even": write_table(
            break_even,
            out_dir / "break_even",
            f"{experiment}: where speculation stops paying",
            note="Speedup [95 % CI] at each measured point and where it falls through 1.0 "
            "(interpolated; the CI's bounds give the range). Batch size: throughput speedup "
            "under the same load; request rate: end-to-end latency speedup.",
            empty="No series sweeps batch size or request rate.",
        ),
        "capacity": write_table(
            sweeps.capacity_table(summary),
            out_dir / "capacity",
            f"{experiment}: goodput and the highest rate served within the SLOs",
            note=f"SLOs: {slo.describe()}. Goodput: requests meeting every SLO per second; "
            "capacity: the highest offered rate whose goodput is within 5 % of it." if slo else "",
            empty="No SLOs set (`slo:` in the experiment), or no sweep of request rate.",
        ),
        "gamma": write_table(
            theory.best_gamma_table([run.result for run in results], summary),
            out_dir / "gamma",
            f"{experiment}: the best gamma, measured and predicted",
            note="Predicted from the measured α, the drafter's cost c and the verification "
            "cost v(w) = 1 + b (w − 1) fitted to the measured verifications (units: the AR "
            "cell's one-token forward).",
            empty="No drafting cell with timed forwards and an AR cell.",
        ),
        "trees": write_table(
            theory.tree_cells_table(summary),
            out_dir / "trees",
            f"{experiment}: what a drafting step verified, cost and yielded",
            note="Per drafting cell (median over repeats): N, the draft nodes a drafting step verified (a chain's "
            "tokens); v(N), that verification forward (N + 1 wide) over the AR cell's one-token forward; c, the "
            "drafter's cost per level of its draft (0 without a draft model); τ, tokens per drafting step, measured "
            "(mean acceptance length) and predicted (chains: Leviathan et al.'s α; trees: the positional acceptance "
            "of their nodes, docs/methodology.md); the speedup, measured and predicted from τ, c and v, prefills added.",
            empty="No drafting cell.",
        ),
        "tree_size": write_table(
            tree_sizes,
            out_dir / "tree_size",
            f"{experiment}: the best tree size, measured and predicted",
            note="Per drafter (its chain and trees pooled): the acceptance p_k of a node's rank-k child once the "
            "earlier ranks were rejected, from the per-node counts; for each N the best tree of N nodes for it "
            "(greedy by root-path probability, no deeper than the drafts went) and its predicted speedup "
            "τ(N) / (c depth + v(N)), v(N) = 1 + b N fitted to the measured verifications, prefills added.",
            empty="No drafter with token trees, timed forwards, node or position counts and an AR cell.",
        ),
        "failed": write_table(
            failed_table(runs),
            out_dir / "failed",
            f"{experiment}: failed runs",
            empty=f"No run of the {len(runs)} failed.",
        ),
        "not_supported": write_table(
            not_supported_table(runs),
            out_dir / "not_supported",
            f"{experiment}: cells the engine does not support",
            empty="Every cell is supported.",
        ),
        "run_info": write_table(run_info_table(runs), out_dir / "run_info", f"{experiment}: what was run"),
        "requests": [write_csv(requests, out_dir / "requests.csv")],
        "itl": [write_csv(itl, out_dir / "itl.csv")],
        "positions": [write_csv(positions_table(results), out_dir / "positions.csv")],
        "tree_sizes": [write_csv(tree_size_points, out_dir / "tree_sizes.csv")],
        "power": [write_csv(power_table(results), out_dir / "power.csv")],
    }
