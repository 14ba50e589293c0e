"""The typed result body of a cell (result.json): one class per block, made from the dict
that `specdec.records` validated against `result.schema.json` and turned back into it key
for key, so that the job writes and the report reads the same object.

Blocks of a fixed shape (metrics, acceptance, theory, engine, the interleaved reference,
memory) are dataclasses field for field; the free-form ones (energy, attribution, checks,
co-tenants, failure, metadata) keep their dict and name what the report reads of them. A field
whose default is None is left out of the dict when it is None (a key the schema makes
optional); every other field is always written, null or not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from specdec.gate.cells import Cell


class Status(str, enum.Enum):
    """How a cell ended. `interrupted` cells write only `interrupted.json` (they rerun)."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_SUPPORTED = "not_supported"  # the engine cannot run this setting (a row of its own)


def _dump(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_dump(item) for item in value]
    return value


class _Block:
    """A dataclass block: its JSON form in field order, optional keys left out when None."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _dump(getattr(self, f.name))
            for f in fields(self)
            if not (f.default is None and getattr(self, f.name) is None)
        }


@dataclass(frozen=True)
class _FreeForm:
    """A block the schema leaves open: its dict as written, read through named properties."""

    data: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(dict(data))

    def to_dict(self) -> dict[str, Any]:
        return self.data


class _entry:
    """A field of a free-form block read from its dict by the attribute's name (None where
    the block has no such key)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, block: _FreeForm | None, owner: type) -> Any:
        return self if block is None else block.data.get(self.key)


def _maybe(kind, data: dict | None):
    return None if data is None else kind.from_dict(data)


# ------------------------------------------------------------------- fixed blocks


@dataclass(frozen=True)
class Dist(_Block):
    """DIST: statistics of a per-request quantity; null statistics when `count` is 0."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    count: int


@dataclass(frozen=True, kw_only=True)
class Metrics(_Block):
    """The `metrics` block (`metrics.summarize`); `window` is absent in older results (span)."""

    num_requests: int
    output_tokens: int
    prompt_tokens: int
    window_s: float
    window: str | None = None
    throughput_tok_s: float
    throughput_req_s: float
    ttft_s: Dist
    tpot_s: Dist
    itl_s: Dist
    itl_token_s: Dist
    e2e_s: Dist
    queue_s: Dist
    request_tok_s: Dist

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        return cls(**{k: Dist.from_dict(v) if isinstance(v, dict) else v for k, v in data.items()})

    def columns(self, dist_fields: tuple[str, ...]) -> dict[str, Any]:
        """Flat columns in field order: a DIST as `{metric}_{field}`, the rest as they are."""
        row: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Dist):
                row.update({f"{f.name}_{key}": getattr(value, key) for key in dist_fields})
            elif value is not None:
                row[f.name] = value
        return row


@dataclass(frozen=True)
class PositionCount(_Block):
    """Drafted and accepted tokens at one draft position (1-based)."""

    position: int
    drafted: int
    accepted: int
    rate: float | None
    rate_per_draft: float | None


@dataclass(frozen=True)
class NodeCount(_Block):
    """A token tree's node (its path of child ranks from the root): how often it was drafted,
    tried by the verifier and accepted."""

    path: tuple[int, ...]
    drafted: int
    tried: int
    accepted: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeCount:
        return cls(**data | {"path": tuple(data["path"])})


@dataclass(frozen=True, kw_only=True)
class Acceptance(_Block):
    """The `acceptance` block (`acceptance.acceptance_block`); `engine_counters` on vLLM cells;
    `nodes_per_draft` and a tree drafter's `per_node` absent in results written before them."""

    drafted_tokens: int
    accepted_tokens: int
    target_forwards: int
    acceptance_rate: float | None
    mean_accepted_length: float | None
    per_position: tuple[PositionCount, ...]
    num_drafts: int | None
    mean_acceptance_length: float | None
    accepted_per_step: tuple[int, ...]
    nodes_per_draft: float | None = None
    per_node: tuple[NodeCount, ...] | None = None
    engine_counters: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Acceptance:
        per_node = data.get("per_node")
        return cls(**data | {"per_position": tuple(map(PositionCount.from_dict, data["per_position"])),
                             "accepted_per_step": tuple(data["accepted_per_step"]),
                             "per_node": None if per_node is None else tuple(map(NodeCount.from_dict, per_node))})

    @property
    def nodes_verified(self) -> float | None:
        """Nodes per drafting step: `nodes_per_draft`, or in a result written before it, the
        same from its counts (drafted_tokens / num_drafts)."""
        if self.nodes_per_draft is not None or not self.num_drafts:
            return self.nodes_per_draft
        return self.drafted_tokens / self.num_drafts


@dataclass(frozen=True)
class Theory(_Block):
    """The `theory` block (`leviathan.theory`): the cell's alpha and its draft lengths."""

    alpha: float
    gamma: int
    longest_draft: int
    draft_length_shares: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Theory:
        return cls(**data | {"draft_length_shares": tuple(data["draft_length_shares"])})


@dataclass(frozen=True)
class Engine(_Block):
    """The engine that ran the cell, its version and settings (`Engine.result_block`)."""

    name: str
    version: str | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class Reference(_Block):
    """An interleaved cell's AR reference (`analysis.interleaved_block`)."""

    kind: str
    requests: str
    metrics: Metrics
    requests_paired: int
    reference_first: int
    window: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        return cls(**data | {"metrics": Metrics.from_dict(data["metrics"])})


@dataclass(frozen=True, kw_only=True)
class Memory(_Block):
    """Peak memory against the models' need (`InProcessEngine.memory`); the baseline RSS on
    the CPU only."""

    weights_mb: float
    kv_cache_mb: float
    device: str
    peak_mb: float
    peak_over_needed: float
    baseline_rss_mb: float | None = None
    growth_over_needed: float | None = None


# --------------------------------------------------------------- free-form blocks


@dataclass(frozen=True)
class Bucket:
    """Forwards of one role and width: how many, their seconds, the batch rows over them."""

    count: int
    total_s: float
    rows: int

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.count if self.count else None


class Energy(_FreeForm):
    """The `energy` block (`power.PowerMonitor.energy`), or why it was not measured."""

    available: bool = _entry()
    method: str | None = _entry()
    reason: str | None = _entry()
    gross_j: float | None = _entry()

    @property
    def gross_j_per_output_token(self) -> float | None:
        return self.data["per_output_token_j"]["gross"] if self.available else None


class Served(_FreeForm):
    """The `served` block of a cell measured through a server (`engines.openai`): how its
    tokens were counted, the server's speculative counters over the window, failed requests."""

    token_count: str | None = _entry()
    server_counters: dict | None = _entry()
    failed_requests: int | None = _entry()


class Attribution(_FreeForm):
    """The `attribution` block (`attribution`): where the decode time went, and the timed
    forwards by role and width (None for a vLLM cell, whose forwards run in its engine)."""

    available: bool = _entry()
    decode_s: float | None = _entry()
    steps: int | None = _entry()

    @property
    def parts_s(self) -> dict[str, float | None]:
        return self.data.get("parts_s") or {}

    @property
    def timed_forwards(self) -> bool:
        """Whether the run timed its forwards (not off, not a vLLM cell)."""
        return self.available and bool(self.data.get("forwards"))

    def forward(self, role: str, width: int | None = None) -> Bucket | None:
        """The bucket of `role`'s forwards (`target_decode`, `drafter`) of `width` new
        tokens, or of a role without widths (`drafter_prefill`); None when none was timed."""
        entry = (self.data.get("forwards") or {}).get(role) if self.available else None
        if entry is not None and width is not None:
            entry = entry.get(str(width))
        return None if entry is None else Bucket(**entry)

    def widths(self, role: str) -> dict[int, Bucket]:
        """`role`'s buckets by width (`target_decode`, `drafter`); empty when none was timed."""
        entries = (self.data.get("forwards") or {}).get(role) if self.available else None
        return {int(width): Bucket(**entry) for width, entry in (entries or {}).items()}


class Check(_FreeForm):
    """A greedy check against a reference (`correctness`, `parity`; `analysis`)."""

    status: str | None = _entry()
    identical: bool | None = _entry()
    near_ties: int | None = _entry()
    defects: int | None = _entry()


class Cotenants(_FreeForm):
    """The machine's load from outside the cell over its window (`cotenants.CotenantWatch`)."""

    available: bool = _entry()
    other_cpu_share: float | None = _entry()
    gpu_processes: list[dict] | None = _entry()

    @property
    def load_average_1m(self) -> float | None:
        """The load average at the window's end."""
        return (self.data.get("load_average_1m") or [None])[-1]


class Failure(_FreeForm):
    """Why a cell failed or is not supported, and in which phase."""

    type: str = _entry()
    message: str = _entry()
    phase: str = _entry()


class Metadata(_FreeForm):
    """Versions, machine and times of the run (`metadata.collect_metadata`), and where it ran."""

    def flat(self) -> dict[str, Any]:
        """The scalar entries, a list joined by commas; nested maps (the GPU lease and
        device maps under `placement`) stay in result.json."""
        return {key: ", ".join(map(str, value)) if isinstance(value, list) else value
                for key, value in self.data.items() if not isinstance(value, dict)}


# ------------------------------------------------------------------------- result


@dataclass(frozen=True, kw_only=True)
class Result(_Block):
    """A cell's result.json, blocks in the order the runner writes them."""

    status: Status
    failure: Failure | None
    metrics: Metrics | None
    acceptance: Acceptance | None
    theory: Theory | None
    energy: Energy
    attribution: Attribution
    correctness: Check | None
    parity: Check | None
    engine: Engine
    cotenants: Cotenants | None = None
    reference: Reference | None = None
    memory: Memory | None = None
    served: Served | None = None
    schema_version: int
    cell_id: str
    group_id: str
    config: Cell
    metadata: Metadata

    @property
    def cell(self) -> Cell:
        return self.config

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """From a dict that passed `result.schema.json` (`records.result_from_dict`)."""
        kinds = {"failure": Failure, "metrics": Metrics, "acceptance": Acceptance, "theory": Theory, "energy": Energy,
                 "attribution": Attribution, "correctness": Check, "parity": Check, "engine": Engine,
                 "cotenants": Cotenants, "reference": Reference, "memory": Memory, "served": Served, "config": Cell, "metadata": Metadata}
        return cls(**{key: _maybe(kinds[key], value) if key in kinds else value for key, value in data.items()}
                   | {"status": Status(data["status"])})
