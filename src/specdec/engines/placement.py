"""Where the target and the drafter live: one pure planning function per benchmark cell.

`plan_placement` turns (strategy, the job's GPUs, the models' sizes, settings) into a
`device_map` for `from_pretrained(device_map=..., max_memory=...)` and the device each
model's inputs go to. It loads no weights and needs no GPU: layer spreads are computed by
accelerate on a meta-device copy of the model built from its config.

Strategies (settings are the cell's `cells.Placement`, validated by the config gate):
  cpu              both models on the CPU
  same             both models on the same GPU (`gpus: k` spreads both over the same k GPUs)
  separate         target on one GPU, drafter on another
  multi_gpu_ratio  `ratio: [T, D]`: target spread over the first T GPUs, drafter over the next D
  auto             transformers/accelerate `device_map="auto"` over the job's first `gpus` GPUs
`max_memory_fraction` (default 0.9) is the share of each GPU the weights may take; the rest
is left for the KV cache and activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import get_balanced_memory
from transformers import AutoModelForCausalLM, PretrainedConfig

from specdec.gate.cells import Placement
from specdec.prepare.models import read_config

STRATEGIES = ("cpu", "same", "separate", "multi_gpu_ratio", "auto")
DEFAULT_MEMORY_FRACTION = 0.9


class PlacementError(ValueError):
    """A placement that cannot be made; raised before any model loads."""


@dataclass(frozen=True)
class GpuInfo:
    """A GPU as this process sees it: `index` is the CUDA ordinal after CUDA_VISIBLE_DEVICES."""

    index: int
    name: str
    total_memory: int  # bytes
    uuid: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What placement needs to know about a model, read from its config without weights."""

    name: str
    config: Any  # transformers PretrainedConfig, used to build a meta-device model
    dtype: Any  # torch.dtype of the loaded weights
    param_bytes: int
    num_layers: int
    trust_remote_code: bool = False  # the config's own modelling code may run (from_config)


@dataclass(frozen=True)
class ModelPlacement:
    """Arguments for one model's `from_pretrained` and where its input ids must go."""

    device_map: str | dict[str, int | str]
    input_device: str
    gpus: tuple[int, ...]
    max_memory: dict[int, int] | None = None  # only for device_map="auto"

    def load_kwargs(self) -> dict:
        kwargs: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = dict(self.max_memory)
        return kwargs


@dataclass(frozen=True)
class PlacementPlan:
    strategy: str
    target: ModelPlacement
    drafter: ModelPlacement | None

    @property
    def gpus(self) -> tuple[int, ...]:
        """Every GPU index either model uses, ascending."""
        used = set(self.target.gpus) | set(self.drafter.gpus if self.drafter else ())
        return tuple(sorted(used))

    def describe(self) -> dict:
        """JSON-ready summary for a result's metadata."""
        models = {"target": self.target, "drafter": self.drafter}
        return {
            "strategy": self.strategy,
            "gpus": list(self.gpus),
            **{
                role: None if p is None else {"device_map": p.device_map, "input_device": p.input_device, "gpus": list(p.gpus)}
                for role, p in models.items()
            },
        }


def gpus_required(placement: Placement, has_drafter: bool) -> int:
    """How many GPUs a job with this placement needs (Snakemake's `resources: gpu=`)."""
    if placement.strategy == "cpu":
        return 0
    if placement.strategy == "separate":
        return 2 if has_drafter else 1
    if placement.strategy == "multi_gpu_ratio":
        target_gpus, drafter_gpus = placement.ratio
        return target_gpus + (drafter_gpus if has_drafter else 0)
    return placement.gpus or 1


def plan_placement(
    placement: Placement,
    gpus: list[GpuInfo],
    target: ModelInfo,
    drafter: ModelInfo | None,
) -> PlacementPlan:
    """Place target and drafter on `gpus` (this job's visible GPUs) or raise PlacementError."""
    strategy = placement.strategy
    if strategy == "cpu":
        on_cpu = ModelPlacement("cpu", "cpu", ())
        return PlacementPlan(strategy, on_cpu, on_cpu if drafter else None)

    needed = gpus_required(placement, drafter is not None)
    if len(gpus) < needed:
        seen = ", ".join(f"{g.index}:{g.name}" for g in gpus) or "none"
        raise PlacementError(
            f"placement {_settings_text(placement)} needs {needed} GPU(s) "
            f"{'for target and drafter ' if drafter else ''}but this job sees {len(gpus)} (GPUs seen: {seen})"
        )
    fraction = placement.max_memory_fraction or DEFAULT_MEMORY_FRACTION
    budget = {g.index: int(g.total_memory * fraction) for g in gpus}

    if strategy == "separate":
        return PlacementPlan(
            strategy,
            _spread(target, [gpus[0].index], budget, strategy),
            _spread(drafter, [gpus[1].index], budget, strategy) if drafter else None,
        )
    if strategy == "multi_gpu_ratio":
        target_count = placement.ratio[0]
        return PlacementPlan(
            strategy,
            _spread(target, [g.index for g in gpus[:target_count]], budget, strategy),
            _spread(drafter, [g.index for g in gpus[target_count:needed]], budget, strategy) if drafter else None,
        )

    # same / auto: both models share the same GPUs; each gets a share of every GPU's budget
    # proportional to its size, so that the two together never oversubscribe a GPU.
    shared = [g.index for g in gpus[:needed]]
    total_bytes = target.param_bytes + (drafter.param_bytes if drafter else 0)

    def share(model: ModelInfo) -> dict[int, int]:
        return {i: budget[i] * model.param_bytes // total_bytes for i in shared}

    place = _auto if strategy == "auto" else _spread
    return PlacementPlan(
        strategy,
        place(target, shared, share(target), strategy),
        place(drafter, shared, share(drafter), strategy) if drafter else None,
    )


def _settings_text(placement: Placement) -> str:
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(placement).items() if v is not None and k != "strategy"}
    return f"{placement.strategy!r}" + (f" {settings}" if settings else "")


def _spread(model: ModelInfo, indices: list[int], budget: dict[int, int], strategy: str) -> ModelPlacement:
    """One GPU: the whole model there. Several: accelerate spreads its layers evenly."""
    memory = _memory_for(model, indices, budget, strategy)
    if len(indices) == 1:
        device = f"cuda:{indices[0]}"
        return ModelPlacement(device, device, tuple(indices))
    meta = _meta_model(model.config, model.dtype, model.trust_remote_code)
    device_map = _balanced_device_map(meta, memory, model.dtype)
    spilled = sorted({str(d) for d in device_map.values() if d not in memory})
    if spilled:
        raise PlacementError(
            f"placement {strategy!r}: {model.name}'s layers do not fit on GPU(s) {_gpu_list(indices)} "
            f"(accelerate would put some on {', '.join(spilled)})"
        )
    return ModelPlacement(device_map, f"cuda:{device_map[_input_module(meta, device_map)]}", tuple(indices))


def _auto(model: ModelInfo, indices: list[int], budget: dict[int, int], strategy: str) -> ModelPlacement:
    """accelerate decides at load time, within these GPUs and this memory; the embeddings,
    first in module order, land on the first of them."""
    memory = _memory_for(model, indices, budget, strategy)
    return ModelPlacement("auto", f"cuda:{indices[0]}", tuple(indices), max_memory=memory)


def _memory_for(model: ModelInfo, indices: list[int], budget: dict[int, int], strategy: str) -> dict[int, int]:
    """The model's per-GPU memory budget, after checking its weights fit in the total."""
    memory = {i: budget[i] for i in indices}
    capacity = sum(memory.values())
    if model.param_bytes > capacity:
        raise PlacementError(
            f"placement {strategy!r}: {model.name} needs {_gib(model.param_bytes)} of weights but GPU(s) "
            f"{_gpu_list(indices)} allow {_gib(capacity)} for it (raise max_memory_fraction or use more GPUs)"
        )
    return memory


def _meta_model(config, dtype, trust_remote_code: bool):
    """The model's modules on the meta device: shapes and dtypes, no memory."""

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    meta.tie_weights()  # tied embeddings count once and stay on one device
    return meta


def _balanced_device_map(meta, memory: dict[int, int], dtype) -> dict[str, int | str]:
    """accelerate's even spread of the layers over `memory`'s GPUs (as device_map="auto" does)."""

    no_split = meta._no_split_modules
    balanced = get_balanced_memory(meta, max_memory=dict(memory), no_split_module_classes=no_split, dtype=dtype)
    return dict(infer_auto_device_map(meta, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype))


def _input_module(meta, device_map: dict) -> str:
    """The device_map key that holds the input embeddings (the longest matching prefix)."""
    embeddings = meta.get_input_embeddings()
    name = next(n for n, m in meta.named_modules() if m is embeddings)
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return max(keys, key=len)


def model_info(config_or_path, dtype=None, name: str | None = None, *, trust_remote_code: bool = False, **load_kwargs) -> ModelInfo:
    """Parameter bytes and layer count of a model from its config alone (no weights read).

    `config_or_path`: a transformers config, a model folder or a hub id.
    `dtype` (torch.dtype or its name, e.g. "bfloat16") is the dtype the weights will be
    loaded in; default: the config's own dtype, else float32.
    `trust_remote_code` and `load_kwargs` (a hub revision) are what `models.model_location`
    gives: the model's own code runs only when trusted.
    """


    if isinstance(config_or_path, PretrainedConfig):
        config = config_or_path
    else:  # a folder, or a hub id read from the local cache (or the hub where it is reachable)
        path = Path(config_or_path)
        if path.exists() and not (path / "config.json").is_file():
            raise PlacementError(f"no model config at {path / 'config.json'}")
        config = read_config(str(config_or_path), name or str(config_or_path), trust_remote_code=trust_remote_code, **load_kwargs)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise PlacementError(f"unknown dtype {dtype!r} for {name or config.name_or_path}")
        dtype = getattr(torch, dtype)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    meta = _meta_model(config, dtype, trust_remote_code)
    text_config = config.get_text_config()
    return ModelInfo(
        name=name or config.name_or_path or config.model_type,
        config=config,
        dtype=dtype,
        param_bytes=sum(p.numel() * p.element_size() for p in meta.parameters()),
        num_layers=text_config.num_hidden_layers,
        trust_remote_code=trust_remote_code,
    )


def resolve_local_gpus() -> list[GpuInfo]:
    """The GPUs this process can use (after CUDA_VISIBLE_DEVICES); empty without CUDA."""

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        gpus.append(GpuInfo(index, props.name, props.total_memory, f"GPU-{uuid}" if uuid else None))
    return gpus


def input_device(model) -> str:
    """Where a loaded model's input ids must go: the device of its input embeddings."""
    return str(model.get_input_embeddings().weight.device)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _gpu_list(indices: list[int]) -> str:
    return ",".join(map(str, indices))
