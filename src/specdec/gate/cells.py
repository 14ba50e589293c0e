"""The typed benchmark cell: one job's complete, validated settings.

`config.expand_matrix` builds these once, from a configuration that passed the gate
(`config.validate`); every layer below takes them as they are. A cell's JSON form
(`to_dict` / `from_dict`, schema `schemas/cell.schema.json`) is what travels to the job and
what `result.json` records under `config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jsonschema

# JSON schema types as the gate reads a config: an integer is an int, never a whole float
# (jsonschema counts 2.0 as an integer; range(2.0) or a slice to 8.0 then fails in a job).
SCHEMA_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
)


def schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, but a float where an integer belongs says so (inside a oneOf,
    jsonschema would only say that the value fits none of its shapes)."""
    wanted_integer = any(e.validator == "type" and e.validator_value == "integer" for e in [error, *error.context])
    if isinstance(error.instance, float) and wanted_integer:
        return f"must be an integer, written without a decimal point; got {error.instance!r}"
    return error.message

# The longest draft a config may ask for: beyond it the per-position tables and the
# verification forward only grow, and no drafter in the field accepts that far.
GAMMA_MAX = 32
METHODS = ("ar", "speculative", "ngram", "suffix", "recycling", "eagle3", "medusa")
# What runs a cell's method: our engine (specdec.decoding), transformers' generate() or vLLM.
ENGINES = ("specdec", "transformers", "vllm", "openai")
MODEL_DRAFTER_METHODS = frozenset({"speculative"})
# A model-free method and the drafter kind that runs it (none loads a model).
MODEL_FREE_METHODS = {"ngram": "ngram", "suffix": "suffix", "recycling": "recycling"}
MODEL_FREE_KINDS = frozenset(MODEL_FREE_METHODS.values())
# A learned head and the drafter kind that runs it: it reads the target's hidden states and
# loads no model of its own (decoding/head_formats.py reads its checkpoint).
HEAD_METHODS = {"eagle3": "eagle3", "medusa": "medusa"}
HEAD_KINDS = frozenset(HEAD_METHODS.values())
# Each method with a drafter kind of its own: the method's name is the kind's.
METHOD_KINDS = MODEL_FREE_METHODS | HEAD_METHODS
DRAFTING_METHODS = frozenset(MODEL_DRAFTER_METHODS | METHOD_KINDS.keys())
DEFAULT_GAMMA = 4
# Where a drafting cell's AR reference is measured: in the AR cell's own job (`separate`), or
# in the cell's job, request by request on the same loaded target (`interleaved`), so that
# the speedup pairs each request with an AR run under the same load.
REFERENCES = ("separate", "interleaved")


@dataclass(frozen=True)
class ModelSpec:
    """A model entry of the config (`models.NAME`)."""

    name: str
    source: str  # embedded | local | hub
    dtype: str = "float32"
    trust_remote_code: bool = False
    path: str | None = None
    id: str | None = None
    revision: str | None = None
    compile: bool | None = None  # static cache + compiled steps; None: on for CUDA, off on the CPU


@dataclass(frozen=True)
class DynamicTreeSpec:
    """A drafter's EAGLE-2 dynamic token tree (`drafters.NAME.tree.dynamic`; kinds model,
    quantized, eagle3):
    expand the `top_k` best nodes of each depth down to `depth`, verify the best `nodes`
    (decoding.trees.DynamicTree grows it)."""

    top_k: int
    depth: int
    nodes: int


@dataclass(frozen=True)
class HeadTraining:
    """How the pipeline trains a head (`drafters.NAME.train`; prepare/head_training.py).

    corpus: the offline text sources (`training_corpus.SOURCES`), or `path`, a JSONL file of
    {"text": ...} lines, in their place. tokens: the corpus tokens the target labels (the
    budget), max_minutes: a wall-time budget beside it (whichever ends first). draft_vocab
    (eagle3): the draft vocabulary's size; num_heads (medusa); steps (eagle3): the
    training-time test's unrolled steps; sequence_tokens x batch_size: one batch;
    held_out_tokens: the held-out split; evaluations: points on the training curve."""

    target: str  # the model (name under models) it is trained for
    corpus: tuple[str, ...] = ("chitchat", "python_stdlib")
    path: str | None = None
    tokens: int = 200_000
    max_minutes: float | None = None
    draft_vocab: int = 8192
    num_heads: int = 3
    steps: int = 3
    sequence_tokens: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    held_out_tokens: int = 8192
    evaluations: int = 5

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadTraining:
        return cls(**data | {"corpus": tuple(data["corpus"])})


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter entry of the config (`drafters.NAME`): a model of its own, a quantised copy
    of the target, a model-free one (n-gram table, suffix tries, recycled successors), a
    learned head (EAGLE-3, Medusa) or the replay of the AR cell's outputs (a measurement tool:
    `decoding.ReplayDrafter`)."""

    name: str
    kind: str  # model | quantized | ngram | suffix | recycling | eagle3 | medusa | replay
    model: ModelSpec | None = None  # kind model; kind replay: the draft model whose forwards pace it, if any
    dtype: str | None = None  # kind quantized: int8 | bf16
    n: int | None = None  # kind ngram
    min_context: int | None = None
    top_k: int | None = None  # kind ngram; kind recycling: successors kept per token
    max_depth: int | None = None  # kind suffix
    max_spec_factor: float | None = None
    min_token_prob: float | None = None
    cache_tokens: int | None = None
    compile: bool | None = None  # kind quantized: as ModelSpec.compile (a model drafter follows its model's)
    error_rate: float | None = None  # kind replay
    cost_ms_per_token: float | None = None
    # kind eagle3 | medusa: the head's folder or hub id (a trained head's: the folder its
    # training rule writes), and how the pipeline trains it, if it does.
    source: str | None = None
    train: HeadTraining | None = None
    # kind model | quantized | ngram | suffix | recycling | eagle3 | medusa: a static token
    # tree (paths of child ranks, decoding.trees); kinds model | quantized | eagle3: or
    # EAGLE-2's dynamic tree
    tree: tuple[tuple[int, ...], ...] | DynamicTreeSpec | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrafterSpec:
        """The inverse of its JSON form (`_drafter_dict`), for data that passed its schema."""
        model, train, tree = data.get("model"), data.get("train"), data.get("tree")
        return cls(**data | {"model": ModelSpec(**model) if model else None,
                             "train": HeadTraining.from_dict(train) if train else None,
                             "tree": DynamicTreeSpec(**tree) if isinstance(tree, dict) else tuple(map(tuple, tree)) if tree else None})

    @property
    def is_head(self) -> bool:
        return self.kind in HEAD_KINDS

    @property
    def measurement_tool(self) -> bool:
        """A replay drafter measures the engine at a set alpha; its speedup is no method's."""
        return self.kind == "replay"


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Placement:
    """Where the models go (the plan itself is `placement.plan_placement`'s)."""

    strategy: str  # cpu | same | separate | multi_gpu_ratio | auto
    ratio: tuple[int, int] | None = None  # multi_gpu_ratio: [target GPUs, drafter GPUs]
    gpus: int | None = None  # auto, same
    max_memory_fraction: float | None = None


@dataclass(frozen=True)
class Load:
    """Closed loop (every first turn at once, `num_requests` of them or one per prompt) or
    open loop (`rate` per second, Poisson or gamma arrivals, for `num_requests` or
    `duration_s`)."""

    mode: str = "closed"
    rate: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    num_requests: int | None = None
    duration_s: float | None = None

    @property
    def is_open(self) -> bool:
        return self.mode == "open"


@dataclass(frozen=True)
class Power:
    """The power monitor's settings: sampling period and the idle baseline before the window."""

    enabled: bool = True
    interval_ms: float = 100.0
    idle_s: float = 2.0

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000.0


@dataclass(frozen=True)
class Endpoint:
    """A running OpenAI-compatible server (engine `openai`): where, which served model, which
    API, the name of the environment variable holding its key (never the key), timeouts."""

    base_url: str | None  # None with `serve`: the job starts the server on loopback
    model: str
    api: str = "completions"  # or "chat"
    api_key_env: str | None = None
    connect_timeout_s: float = 10.0
    first_token_timeout_s: float = 300.0  # also the longest gap between chunks
    request_timeout_s: float = 600.0
    metrics: bool = True  # scrape the server's Prometheus /metrics at the window's edges
    # `serve`: the job starts vLLM's OpenAI server from vLLM's environment with these extra
    # arguments, and waits up to `startup_timeout_s` for its health.
    serve: bool = False
    serve_args: tuple[str, ...] = ()
    startup_timeout_s: float = 900.0
    serve_gpus: int = 0  # the GPUs the started server runs on (its parallel sizes in serve_args; 0: the CPU)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Cell:
    """One benchmark job. `gamma` is 0 for AR (nothing drafted)."""

    experiment: str
    dataset: str
    target: ModelSpec
    method: str
    drafter: DrafterSpec | None
    gamma: int
    batch_size: int
    generation: Generation
    placement: Placement
    load: Load
    repeat: int
    seed: int
    warmup: int = 1
    timeout_s: float | None = None
    power: Power = Power()
    engine: str = "specdec"
    attribution: bool = True  # time where decode time goes (attribution.py); not in the name, as warmup is not
    # REFERENCES; AR cells are `separate` (they are the reference). Not in the name: the
    # method decodes the same either way (two cells differing only here are refused).
    reference: str = "separate"
    endpoint: Endpoint | None = None  # the server an `openai` cell measures

    @property
    def greedy(self) -> bool:
        return self.generation.greedy

    @property
    def drafts(self) -> bool:
        return self.gamma > 0

    @property
    def interleaved(self) -> bool:
        """The job also decodes every request with AR, alternating (`measure.interleave`)."""
        return self.reference == "interleaved"

    @property
    def drafter_model(self) -> ModelSpec | None:
        """The model a drafter loads: its own (a replay drafter's pacing model, if any), or the
    target for a quantised copy."""
        if self.drafter is None or self.drafter.kind in MODEL_FREE_KINDS | HEAD_KINDS:
            return None
        return self.target if self.drafter.kind == "quantized" else self.drafter.model

    @property
    def group(self) -> str:
        """The name without the repeat: every setting that makes the cell what it is."""
        method = f"{self.engine}-{self.method}" + (f"-{self.drafter.name}" if self.drafter else "")
        if self.drafts:
            method += f"-g{self.gamma}"
        g = self.generation
        settings = f"b{self.batch_size}-n{g.max_new_tokens}-t{_tag(g.temperature)}"
        if g.top_k:
            settings += f"-k{g.top_k}"
        if g.top_p < 1.0:
            settings += f"-p{_tag(g.top_p)}"
        settings += f"-{_placement_tag(self.placement)}{_load_tag(self.load)}"
        return f"{self.dataset}--{method}--{settings}"

    @property
    def name(self) -> str:
        """Short, stable and readable: `{dataset}--{engine}-{method}[-{drafter}][-g{gamma}]--{settings}--r{repeat}`;
        also the cell's folder under `runs/{experiment}/`."""
        return f"{self.group}--r{self.repeat}"

    @property
    def id(self) -> str:
        return f"{self.experiment}/{self.name}"

    @property
    def group_id(self) -> str:
        """The id without the repeat: repeats of one setting share it."""
        return f"{self.experiment}/{self.group}"

    def ar_counterpart(self, engine: str | None = None) -> Cell:
        """The AR cell that differs from this one only in the decoding method (and, given
        `engine`, in the engine that runs it)."""
        return dataclasses.replace(self, method="ar", drafter=None, gamma=0, engine=engine or self.engine, reference="separate")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (schema `cell.schema.json`), with the derived `cell` name beside it;
        `endpoint`, a head's `source` and `train` and a drafter's `tree` only where there are
        some (other cells' forms stay as they were)."""
        data = _plain(dataclasses.asdict(self))
        if data["endpoint"] is None:
            del data["endpoint"]
        if data["drafter"] is not None:
            data["drafter"] = _drafter_dict(data["drafter"])
        return data | {"cell": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """The inverse of `to_dict`, for data that passed `cell.schema.json` (`records`)."""
        fields = {k: v for k, v in data.items() if k != "cell"}
        drafter = DrafterSpec.from_dict(fields["drafter"]) if fields["drafter"] is not None else None
        placement = fields["placement"]
        if placement.get("ratio") is not None:
            placement = placement | {"ratio": tuple(placement["ratio"])}
        return cls(
            **fields
            | {
                "target": ModelSpec(**fields["target"]),
                "drafter": drafter,
                "generation": Generation(**fields["generation"]),
                "placement": Placement(**placement),
                "load": Load(**fields["load"]),
                "power": Power(**fields["power"]),
                "endpoint": Endpoint(**fields["endpoint"] | {"serve_args": tuple(fields["endpoint"]["serve_args"])})
                if fields.get("endpoint") else None,
            }
        )


def _drafter_dict(drafter: dict[str, Any]) -> dict[str, Any]:
    """A drafter's JSON form: a head's `source` and `train` and a tree drafter's `tree` only
    where they are set (other drafters' forms stay as they were before those keys)."""
    return {k: v for k, v in drafter.items() if k not in ("source", "train", "tree") or v is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tag(value: float) -> str:
    return f"{value:g}"


def _placement_tag(placement: Placement) -> str:
    tag = placement.strategy
    if placement.ratio:
        tag += "{}x{}".format(*placement.ratio)
    if placement.gpus:
        tag += f"{placement.gpus}gpu"
    if placement.max_memory_fraction is not None:
        tag += f"-mem{_tag(placement.max_memory_fraction)}"
    return tag


def _load_tag(load: Load) -> str:
    if not load.is_open:
        return f"-req{load.num_requests}" if load.num_requests else ""
    size = f"n{load.num_requests}" if load.num_requests else f"d{_tag(load.duration_s)}"
    shape = _tag(load.burstiness) if load.arrival == "gamma" else ""
    return f"-rate{_tag(load.rate)}-{load.arrival}{shape}{size}"


@dataclass(frozen=True)
class HeadJob:
    """One head the pipeline trains (workflow rule train_drafter): the drafter entry, with its
    `train` settings and the folder it is written to (`source`), the target it is trained
    for, and the seed. JSON form: `schemas/head_job.schema.json`."""

    drafter: DrafterSpec
    target: ModelSpec
    seed: int

    def to_dict(self) -> dict[str, Any]:
        drafter = _drafter_dict(_plain(dataclasses.asdict(self.drafter)))
        return {"drafter": drafter, "target": _plain(dataclasses.asdict(self.target)), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadJob:
        """The inverse of `to_dict`, for data that passed `head_job.schema.json` (`records`)."""
        return cls(DrafterSpec.from_dict(data["drafter"]), ModelSpec(**data["target"]), data["seed"])
