"""Goodput under latency SLOs as `vllm bench serve --goodput` counts it: the requests that
meet every SLO per second of the measured window, and the share meeting each one."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd

from specdec.report import columns as col

# SLO key -> the per-request latency (aggregate.request_tables, seconds) it bounds.
LATENCIES = {"ttft_ms": col.TTFT_S, "tpot_ms": col.TPOT_S, "e2e_ms": col.E2E_S}
COLUMNS = (col.GOODPUT_REQ_S, col.SLO_MET, "slo_ttft_met", "slo_tpot_met", "slo_e2e_met")


@dataclass(frozen=True)
class Slo:
    """An experiment's `slo:` (any subset of the three, in milliseconds; validated by the
    config schema)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def from_config(cls, section: dict | None) -> Slo | None:
        if not section:
            return None
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"slo: unknown key(s) {unknown}; known: {sorted(LATENCIES)}")
        return cls(**{key: float(value) for key, value in section.items()})

    def limits_s(self) -> dict[str, float]:
        """Per-request latency column -> its limit in seconds, for the SLOs that are set."""
        return {LATENCIES[key]: value / 1000 for key in LATENCIES if (value := getattr(self, key)) is not None}

    def describe(self) -> str:
        return ", ".join(f"{key.removesuffix('_ms').upper()} ≤ {getattr(self, key):g} ms" for key in LATENCIES if getattr(self, key) is not None)


def run_goodput(requests: pd.DataFrame, windows: pd.Series, slo: Slo | None) -> pd.DataFrame:
    """Per run (`cell`): goodput in requests per second of its window (`windows`, seconds,
    indexed by `cell`), the share of requests meeting every SLO and each one (missing for
    an SLO that is not set). A one-token output has no TPOT and meets a TPOT SLO, as vLLM
    counts it (its TPOT is 0 there)."""
    if slo is None or requests.empty:
        return pd.DataFrame(columns=[col.CELL, *COLUMNS])
    met = pd.DataFrame({col.CELL: requests[col.CELL]})
    for column, limit in slo.limits_s().items():
        met[f"slo_{column.removesuffix('_s')}_met"] = requests[column].isna() | (requests[column] <= limit) if column == col.TPOT_S else requests[column] <= limit
    checks = [c for c in met.columns if c != col.CELL]
    met[col.SLO_MET] = met[checks].all(axis=1)
    table = met.groupby(col.CELL).mean().astype(float)
    good = met.groupby(col.CELL)[col.SLO_MET].sum()
    table[col.GOODPUT_REQ_S] = good / windows.reindex(table.index)
    return table.reindex(columns=list(COLUMNS)).reset_index()
