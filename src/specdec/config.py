"""Benchmark configuration: schema validation, cross-references, and the experiment matrix.

An experiment is a matrix (dataset x method x drafter x gamma x batch size x max new tokens x
temperature x placement x load x repeat). Every cell becomes one benchmark job with a short,
stable id that is also its path under `results/runs/{experiment}/{cell}/`.
"""

from __future__ import annotations

import copy
import itertools
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

METHODS_WITH_MODEL_DRAFTER = {"speculative", "hf_assisted"}
METHODS_WITH_NGRAM_DRAFTER = {"ngram"}
METHODS_WITH_GAMMA = {"speculative", "ngram", "hf_assisted", "hf_prompt_lookup"}
DEFAULT_GAMMA = 4


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


def schema_path() -> Path:
    return Path(str(resources.files("specdec") / "schemas" / "config.schema.yaml"))


def _validator_with_defaults(schema: dict) -> jsonschema.protocols.Validator:
    """A validator that also fills in `default` values, as Snakemake's validate does, and
    resolves relative `$ref`s (the dataset entry schema) beside the config schema."""
    base = jsonschema.Draft202012Validator
    folder = schema_path().parent

    def retrieve(uri: str) -> Resource:
        return Resource.from_contents(yaml.safe_load((folder / uri.rsplit("/", 1)[-1]).read_text()))

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    schema = dict(schema, **{"$id": schema_path().as_uri()})
    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema, registry=Registry(retrieve=retrieve))


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate(config: dict) -> dict:
    """Validate against the schema (filling defaults) and check every cross-reference.

    Returns the same dict, completed with defaults. Raises ConfigError naming the key."""
    schema = yaml.safe_load(schema_path().read_text())
    error = jsonschema.exceptions.best_match(_validator_with_defaults(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{_key_path(error)}': {error.message}")
    check_references(config)
    return config


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate(config)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def check_references(config: dict) -> None:
    """Every model, drafter and dataset an experiment names must be defined, and fit its method."""
    models, drafters, datasets = config["models"], config.get("drafters", {}), config["datasets"]
    for name, drafter in drafters.items():
        if drafter["kind"] == "model" and drafter["model"] not in models:
            raise ConfigError(f"config key 'drafters.{name}.model': model {drafter['model']!r} is not defined under models")
        if drafter["kind"] == "ngram" and drafter["min_context"] > drafter["n"] - 1:
            raise ConfigError(f"config key 'drafters.{name}.min_context': {drafter['min_context']} exceeds n - 1 = {drafter['n'] - 1}, the longest context")
    for exp_name, exp in config["experiments"].items():
        where = f"experiments.{exp_name}"
        if exp["target"] not in models:
            raise ConfigError(f"config key '{where}.target': model {exp['target']!r} is not defined under models")
        for dataset in exp["datasets"]:
            if dataset not in datasets:
                raise ConfigError(f"config key '{where}.datasets': dataset {dataset!r} is not defined under datasets")
        target_dtype = models[exp["target"]].get("dtype", "float32")
        for i, entry in enumerate(exp["methods"]):
            _check_method(entry, drafters, f"{where}.methods.{i}")
            for name in _as_list(entry.get("drafter", [])):
                if drafters[name].get("dtype") == "int8" and target_dtype != "float32":
                    raise ConfigError(f"config key '{where}.methods.{i}.drafter': drafter {name!r} quantises the target to int8, which starts from float32 weights; "
                                      f"models.{exp['target']}.dtype is {target_dtype!r} (use a bf16 drafter, or a float32 target)")
        for placement in map(_placement_dict, _as_list(exp["placement"])):
            if placement["strategy"] == "multi_gpu_ratio" and "ratio" not in placement:
                raise ConfigError(f"config key '{where}.placement': multi_gpu_ratio needs a ratio [target GPUs, drafter GPUs]")
        for load in _as_list(exp["load"]):
            if load["mode"] == "open" and not ("num_requests" in load or "duration_s" in load):
                raise ConfigError(f"config key '{where}.load': open-loop load needs num_requests or duration_s")


def _check_method(entry: dict, drafters: dict, where: str) -> None:
    method = entry["method"]
    names = _as_list(entry.get("drafter", []))
    if method in METHODS_WITH_MODEL_DRAFTER | METHODS_WITH_NGRAM_DRAFTER and not names:
        raise ConfigError(f"config key '{where}.drafter': method {method!r} needs a drafter")
    if method not in METHODS_WITH_MODEL_DRAFTER | METHODS_WITH_NGRAM_DRAFTER and names:
        raise ConfigError(f"config key '{where}.drafter': method {method!r} takes no drafter")
    if method not in METHODS_WITH_GAMMA and "gamma" in entry:
        raise ConfigError(f"config key '{where}.gamma': method {method!r} takes no gamma")
    for name in names:
        if name not in drafters:
            raise ConfigError(f"config key '{where}.drafter': drafter {name!r} is not defined under drafters")
        kind = drafters[name]["kind"]
        if method in METHODS_WITH_NGRAM_DRAFTER and kind != "ngram":
            raise ConfigError(f"config key '{where}.drafter': method 'ngram' needs an ngram drafter, {name!r} is {kind!r}")
        if method in METHODS_WITH_MODEL_DRAFTER and kind == "ngram":
            raise ConfigError(f"config key '{where}.drafter': method {method!r} needs a model drafter, {name!r} is an ngram drafter")


def _placement_dict(placement: str | dict) -> dict:
    return {"strategy": placement} if isinstance(placement, str) else dict(placement)


def _number_tag(value: float) -> str:
    return f"{value:g}"


def _placement_tag(placement: dict) -> str:
    tag = placement["strategy"]
    if "ratio" in placement:
        tag += "{}x{}".format(*placement["ratio"])
    if "gpus" in placement:
        tag += f"{placement['gpus']}gpu"
    return tag


def _load_tag(load: dict) -> str:
    if load["mode"] == "closed":
        return ""
    size = f"n{load['num_requests']}" if "num_requests" in load else f"d{_number_tag(load['duration_s'])}"
    return f"-rate{_number_tag(load['rate'])}-{load.get('arrival', 'poisson')}{size}"


def cell_name(cell: dict) -> str:
    """Short, stable and readable: `{dataset}--{method}[-{drafter}][-g{gamma}]--{settings}--r{repeat}`."""
    method = cell["method"]
    if cell["drafter"]:
        method += f"-{cell['drafter']}"
    if cell["gamma"] is not None:
        method += f"-g{cell['gamma']}"
    settings = f"b{cell['batch_size']}-n{cell['max_new_tokens']}-t{_number_tag(cell['temperature'])}"
    if cell["top_k"]:
        settings += f"-k{cell['top_k']}"
    if cell["top_p"] < 1.0:
        settings += f"-p{_number_tag(cell['top_p'])}"
    settings += f"-{_placement_tag(cell['placement'])}{_load_tag(cell['load'])}"
    return f"{cell['dataset']}--{method}--{settings}--r{cell['repeat']}"


def _method_variants(entry: dict) -> list[tuple[str, str | None, int | None]]:
    method = entry["method"]
    drafters = _as_list(entry.get("drafter", [None]))
    gammas = _as_list(entry.get("gamma", DEFAULT_GAMMA)) if method in METHODS_WITH_GAMMA else [None]
    return [(method, d, g) for d in drafters for g in gammas]


def expand_matrix(config: dict) -> list[dict]:
    """All benchmark cells of all experiments, each a self-contained resolved config."""
    cells = []
    for exp_name, exp in config["experiments"].items():
        axes = itertools.product(
            exp["datasets"],
            [v for entry in exp["methods"] for v in _method_variants(entry)],
            _as_list(exp["batch_size"]),
            _as_list(exp["max_new_tokens"]),
            _as_list(exp["temperature"]),
            [_placement_dict(p) for p in _as_list(exp["placement"])],
            _as_list(exp["load"]),
            range(exp["repeats"]),
        )
        for dataset, (method, drafter, gamma), batch, max_new, temp, placement, load, repeat in axes:
            cell = {
                "experiment": exp_name,
                "dataset": dataset,
                "target": exp["target"],
                "method": method,
                "drafter": drafter,
                "gamma": gamma,
                "batch_size": batch,
                "max_new_tokens": max_new,
                "temperature": float(temp),
                "top_k": exp["top_k"],
                "top_p": float(exp["top_p"]),
                "placement": placement,
                "load": load,
                "repeat": repeat,
                "seed": config["seed"] + repeat,
                "warmup": exp["warmup"],
                "timeout_s": exp.get("timeout_s"),
                "models": {exp["target"]: config["models"][exp["target"]]},
                "drafters": {drafter: config["drafters"][drafter]} if drafter else {},
                "power": config["power"],
            }
            if drafter and config["drafters"][drafter]["kind"] == "model":
                model = config["drafters"][drafter]["model"]
                cell["models"][model] = config["models"][model]
            cell["cell"] = cell_name(cell)
            cells.append(cell)
    _check_unique(cells)
    return cells


def _check_unique(cells: list[dict]) -> None:
    seen: set[str] = set()
    for cell in cells:
        key = f"{cell['experiment']}/{cell['cell']}"
        if key in seen:
            raise ConfigError(f"config key 'experiments.{cell['experiment']}': two cells resolve to the same id {key!r}")
        seen.add(key)


def reference_cell(cell: dict, cells: list[dict]) -> dict | None:
    """The AR cell whose greedy outputs a greedy speculative cell must reproduce exactly."""
    if cell["method"] == "ar" or cell["temperature"] > 0:
        return None
    same = ("experiment", "dataset", "target", "max_new_tokens", "temperature", "top_k", "top_p", "repeat")
    candidates = [c for c in cells if c["method"] == "ar" and all(c[k] == cell[k] for k in same)]
    # Prefer the AR run whose batch shape and placement match, so numerics match too.
    candidates.sort(key=lambda c: (c["batch_size"] != cell["batch_size"], c["placement"] != cell["placement"], c["load"] != cell["load"]))
    return candidates[0] if candidates else None
