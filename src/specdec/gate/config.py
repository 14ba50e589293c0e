"""The configuration gate: the one place a config is validated, and the matrix it expands to.

`validate` is the only validation: the schema (`schemas/config.schema.yaml`, with `if`/`then`
where keys depend on each other; integers are ints, sizes bounded) plus `check_references`, the
checks a schema cannot express (numbers finite among them), each dataset entry's own checks
included. `check_inputs` adds the cheap checks of the local files a config names (dataset
files, local model folders), so that what a later step would refuse is refused here (`specdec
check-config` and the Snakefile run both). `expand_matrix` then builds every experiment's cells
(`cells.Cell`) once (dataset x engine x method x drafter x gamma x batch size x max new tokens x temperature x placement
x load x repeat), each with its AR reference (`_reference`); nothing below re-validates them.
"""

from __future__ import annotations

import copy
import itertools
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml
from referencing import Registry, Resource

from specdec.engines import REFERENCE, engine_class
from specdec.gate.cells import (
    DEFAULT_GAMMA,
    DRAFTING_METHODS,
    HEAD_KINDS,
    METHOD_KINDS,
    MODEL_DRAFTER_METHODS,
    MODEL_FREE_KINDS,
    SCHEMA_TYPES,
    Cell,
    DrafterSpec,
    DynamicTreeSpec,
    HeadJob,
    HeadTraining,
    Endpoint,
    Generation,
    Load,
    ModelSpec,
    Placement,
    Power,
    schema_message,
)
from specdec.prepare import datasets as dataset_entries
from specdec.decoding.head_formats import HeadMismatch, head_spec
from specdec.decoding import medusa, recycling, suffix
from specdec.decoding.medusa import MedusaSpec
from specdec.decoding.trees import DynamicTree, TreeShape
from specdec.prepare.models import EMBEDDED_DIR, ModelError, local_folder, read_config


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key (or file and line)."""


# Top-level keys a config may no longer hold, and what took their place.
REMOVED_KEYS = {
    "vllm": "a config does not name a program to run (vllm.venv did): vLLM cells run in the environment "
            "SPECDEC_VLLM_VENV names, else in .venv-vllm beside the Snakefile (`make install-vllm`); drop the key",
}


def schema_path() -> Path:
    return Path(str(resources.files("specdec") / "schemas" / "config.schema.yaml"))


def _validator_with_defaults(schema: dict) -> jsonschema.protocols.Validator:
    """A validator that fills in `default` values, as Snakemake's validate does, and resolves
    relative `$ref`s (the dataset entry schema) beside the config schema."""
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
    validator = jsonschema.validators.extend(base, {"properties": set_defaults}, type_checker=SCHEMA_TYPES)
    return validator(schema, registry=Registry(retrieve=retrieve))


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate(config: dict) -> dict:
    """Validate against the schema (filling defaults) and check every cross-reference.

    Returns the same dict, completed with defaults. Raises ConfigError naming the key."""
    check_removed_keys(config)
    schema = yaml.safe_load(schema_path().read_text())
    error = jsonschema.exceptions.best_match(_validator_with_defaults(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{_key_path(error)}': {schema_message(error)}")
    check_references(config)
    return config


def check_removed_keys(config: dict) -> None:
    """A removed key is refused with where its job went, not as an unknown key."""
    for key, instead in REMOVED_KEYS.items():
        if key in config:
            raise ConfigError(f"config key '{key}': removed: {instead}")


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML whose mappings refuse a key given twice (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key].line + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


# A config has hundreds of values; YAML aliases can make a few lines stand for billions (an
# "alias bomb"), which whatever walks the data (the schema, Snakemake) never finishes.
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """How many values `node` stands for with every alias written out (`sizes`: per node
    object, as an alias is the node it names; None while counting it, to find a loop)."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise yaml.MarkedYAMLError(problem="an alias refers to a value that holds it", problem_mark=node.start_mark)
        return sizes[key]
    sizes[key] = None
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    sizes[key] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[key]


def read_yaml(path: str | Path) -> Any:
    """A YAML file as data; an error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loader = _StrictLoader(path.read_text())
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
                raise ConfigError(f"{path}: its aliases (*name) expand it to more than {MAX_YAML_VALUES:,} values; "
                                  "write the values out, or use fewer nested aliases")
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: {exc.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path) -> dict:
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate(config)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def _non_finite(value: Any, path: str = "") -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "<top level>"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{path}.{i}")


# The most requests one load sends: the schema's bound of num_requests, and of rate x duration_s.
MAX_REQUESTS = 100_000


def check_references(config: dict) -> None:
    """What the schema cannot say: every model, drafter and dataset an experiment names is
    defined and fits its method, each dataset entry passes its own checks
    (`datasets.spec_problem`), an open load's rate x duration_s is bounded, and no number
    anywhere is NaN or infinite (JSON schema counts them as numbers)."""
    for key in _non_finite(config):
        raise ConfigError(f"config key '{key}': must be a finite number")
    models, drafters, datasets = config["models"], config.get("drafters", {}), config["datasets"]
    for name, spec in datasets.items():
        if (problem := dataset_entries.spec_problem(spec)) is not None:
            raise ConfigError(f"config key 'datasets.{name}{problem[0][1:]}': {problem[1]}")
    for name, drafter in drafters.items():
        if "model" in drafter and drafter["model"] not in models:
            raise ConfigError(f"config key 'drafters.{name}.model': model {drafter['model']!r} is not defined under models")
        if "compile" in drafter and drafter["kind"] != "quantized":
            raise ConfigError(f"config key 'drafters.{name}.compile': only a quantized drafter takes compile; "
                              f"a {drafter['kind']} drafter " + ("follows its model's models.NAME.compile" if drafter["kind"] == "model" else "runs no model"))
        if drafter["kind"] == "replay" and "model" in drafter and drafter["cost_ms_per_token"]:
            raise ConfigError(f"config key 'drafters.{name}.cost_ms_per_token': a replay drafter is paced either by its model's "
                              "forwards (model) or by a set cost per draft token, not both; drop one of the two")
        origins = [key for key in HEAD_ORIGINS if key in drafter]
        if drafter["kind"] in HEAD_KINDS and len(origins) != 1:
            raise ConfigError(f"config key 'drafters.{name}': a learned head ({drafter['kind']}) comes from a checkpoint (source: folder or hub id), "
                              "from the pipeline's training (train: {...}) or from another head drafter (head: NAME); give "
                              + (f"one of {' and '.join(origins)}" if origins else "one of them"))
        for key in HEAD_ORIGINS:
            if key in drafter and drafter["kind"] not in HEAD_KINDS:
                raise ConfigError(f"config key 'drafters.{name}.{key}': only a learned head (kind eagle3 or medusa) takes {key}")
        if "head" in drafter:
            _check_borrowed_head(name, drafter, drafters)
        if "tree" in drafter:
            _check_tree(name, drafter, drafters)
        if drafter["kind"] == "ngram" and drafter["min_context"] > drafter["n"] - 1:
            raise ConfigError(f"config key 'drafters.{name}.min_context': {drafter['min_context']} exceeds n - 1 = {drafter['n'] - 1}, the longest context")
    for name in config.get("run", []):
        if name not in config["experiments"]:
            raise ConfigError(f"config key 'run': experiment {name!r} is not defined under experiments")
    for exp_name, exp in config["experiments"].items():
        where = f"experiments.{exp_name}"
        if exp["target"] not in models:
            raise ConfigError(f"config key '{where}.target': model {exp['target']!r} is not defined under models")
        for dataset in exp["datasets"]:
            if dataset not in datasets:
                raise ConfigError(f"config key '{where}.datasets': dataset {dataset!r} is not defined under datasets")
        for i, load in enumerate(_as_list(exp["load"])):
            if load["mode"] == "open" and "duration_s" in load and load["rate"] * load["duration_s"] > MAX_REQUESTS:
                key = f"{where}.load" + (f".{i}" if isinstance(exp["load"], list) else "")
                raise ConfigError(f"config key '{key}.duration_s': rate x duration_s = {load['rate'] * load['duration_s']:g} "
                                  f"requests, above the {MAX_REQUESTS} a load may send (as num_requests)")
        target_dtype = models[exp["target"]].get("dtype", "float32")
        for i, entry in enumerate(exp["methods"]):
            _check_method(entry, drafters, f"{where}.methods.{i}")
            _check_reference(exp, entry, f"{where}.methods.{i}", where)
            _check_replay(exp, entry, drafters, f"{where}.methods.{i}")
            for name in _as_list(entry.get("drafter", [])):
                if drafters[name].get("dtype") == "int8" and target_dtype != "float32":
                    raise ConfigError(f"config key '{where}.methods.{i}.drafter': drafter {name!r} quantises the target to int8, which starts from float32 weights; "
                                      f"models.{exp['target']}.dtype is {target_dtype!r} (use a bf16 drafter, or a float32 target)")
                if drafters[name].get("dtype") == "int8" and any(_placement_dict(p)["strategy"] != "cpu" for p in _as_list(exp["placement"])):
                    raise ConfigError(f"config key '{where}.placement': drafter {name!r} is an int8 dynamic quantisation, which runs on the CPU only; use placement cpu or a bf16 drafter")
    # after the experiments' targets are known to exist
    for name, target in _head_targets(config).items():
        if len(target) > 1:
            raise ConfigError(f"config key 'drafters.{name}.train': a head is trained for one target; "
                              f"experiments use it with {sorted(target)} (define one drafter per target)")


def experiments_using(config: dict, drafter: str) -> list[dict]:
    """The experiments (their config entries) with a method that drafts with `drafter`, or
    with a drafter that borrows its head (`drafters.NAME.head`)."""
    names = {drafter} | {name for name, spec in config.get("drafters", {}).items() if spec.get("head") == drafter}
    return [exp for exp in config["experiments"].values()
            if any(names & set(_as_list(entry.get("drafter", []))) for entry in exp["methods"])]


def _head_owner(drafters: dict, name: str) -> tuple[str, dict]:
    """The drafter whose `source` or `train` a head drafter draws with: itself, or the one its
    `head` names."""
    owner = drafters[name].get("head", name)
    return owner, drafters[owner]


def _check_borrowed_head(name: str, drafter: dict, drafters: dict) -> None:
    owner = drafters.get(drafter["head"])
    if owner is None or owner["kind"] != drafter["kind"] or "head" in owner:
        heads = sorted(n for n, d in drafters.items() if d["kind"] == drafter["kind"] and "head" not in d)
        raise ConfigError(f"config key 'drafters.{name}.head': {drafter['head']!r} is not a {drafter['kind']} drafter with a source or train "
                          f"of its own; {drafter['kind']} heads here: {', '.join(heads) or 'none'}")


def _head_targets(config: dict) -> dict[str, set[str]]:
    """The targets each trained head is used with, by drafter name."""
    return {name: {exp["target"] for exp in experiments_using(config, name)}
            for name, drafter in config.get("drafters", {}).items() if "train" in drafter}


def head_folder(config: dict, name: str) -> str:
    """Where the pipeline writes the head it trains for drafter `name` (workflow rule
    train_drafter), which the cells read as the head's source."""
    return f"{config['results_dir']}/heads/{name}"


def head_jobs(config: dict) -> dict[str, HeadJob]:
    """The heads the pipeline trains, by drafter name: those with `train` that an experiment uses."""
    drafters = config.get("drafters", {})
    jobs = {}
    for name, targets in _head_targets(config).items():
        if targets:
            target = next(iter(targets))
            jobs[name] = HeadJob(_drafter(name, drafters[name], config), _model(target, config["models"][target]), config["seed"])
    return jobs


def check_inputs(config: dict) -> None:
    """The cheap checks of the local files a validated config names, which the jobs would
    otherwise refuse later: each dataset's files (present, regular, within the size limit)
    and each local model's folder (holding a config.json); then what needs a target's config
    (`_target_config`): each head against it, each token tree's nodes against its context.
    The embedded model is made by the pipeline itself; hub models are not looked up here."""
    for name, spec in config["datasets"].items():
        try:
            dataset_entries.dataset_files(spec)
        except dataset_entries.DatasetError as err:
            key = next((k for k in ("paths", "path") if k in spec), "source")
            raise ConfigError(f"config key 'datasets.{name}.{key}': {err}") from None
    for name, spec in config["models"].items():
        if spec["source"] == "local":
            try:
                local_folder(name, spec["path"])
            except ModelError as err:
                raise ConfigError(str(err)) from None
    _check_heads(config)
    _check_tree_context(config)


def _check_tree(name: str, drafter: dict, drafters: dict) -> None:
    """A drafter's token tree is a tree its kind can draft: static trees for TREE_KINDS, with
    no node the drafter could never fill (TREE_REACH; a trained Medusa: no deeper than its
    heads); dynamic trees for DYNAMIC_TREE_KINDS, with no more nodes than they grow."""
    kind, tree = drafter["kind"], drafter["tree"]
    key = f"drafters.{name}.tree" + (".dynamic" if "dynamic" in tree else "")
    kinds = DYNAMIC_TREE_KINDS if "dynamic" in tree else TREE_KINDS
    if kind not in kinds:
        what = "EAGLE-2's dynamic trees grow from a draft model's or head's joint probabilities" if "dynamic" in tree else "token trees"
        raise ConfigError(f"config key '{key}': a {kind} drafter drafts {'static trees or ' if kind in TREE_KINDS else ''}chains here; "
                          f"{what}: kinds {', '.join(sorted(kinds))}")
    try:
        shape = tree_shape(tree)
        if kind in TREE_REACH:
            TREE_REACH[kind](shape, drafter)
    except ValueError as error:
        raise ConfigError(f"config key '{key}{'.nodes' if 'dynamic' in tree else ''}': {error}") from None
    trained = _head_owner(drafters, name)[1]
    if kind == "medusa" and "train" in trained:
        _check_medusa_depth(name, shape, trained["train"]["num_heads"], f"train.num_heads is {trained['train']['num_heads']}")


def _check_medusa_depth(name: str, shape: TreeShape, heads: int, why: str) -> None:
    try:
        medusa.check_tree(shape, heads)
    except ValueError as error:
        raise ConfigError(f"config key 'drafters.{name}.tree': {error} ({why})") from None


def _check_heads(config: dict) -> None:
    """Each head a config names by `source` is read (config only) and checked against every
    target it drafts for, where that target's config is at hand (a local folder, or the
    embedded model once prepared; a hub target's head is checked when the cell loads); a
    Medusa's tree against its heads (a drafter that borrows the head, by its own tree)."""
    drafters = config.get("drafters", {})
    for name, drafter in drafters.items():
        owner, origin = _head_owner(drafters, name)
        if drafter["kind"] not in HEAD_KINDS or "source" not in origin:
            continue
        for exp in experiments_using(config, name):
            try:
                target_config = _target_config(config, exp["target"])
                if target_config is None:
                    continue
                _, spec = head_spec(origin["source"], target_config, drafter["kind"])
            except (HeadMismatch, ModelError) as err:
                raise ConfigError(f"config key 'drafters.{owner}.source': {err}") from None
            if isinstance(spec, MedusaSpec) and "tree" in drafter:
                _check_medusa_depth(name, tree_shape(drafter["tree"]), spec.num_heads, f"source {origin['source']}")


def _target_config(config: dict, name: str):
    """Model `name`'s transformers config where it is at hand (a local folder, or the embedded
    model once prepared), else None (a hub model's: checked when the cell loads)."""
    model = config["models"][name]
    folder = Path(model["path"]) if model["source"] == "local" else EMBEDDED_DIR.parent / name if model["source"] == "embedded" else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    return read_config(str(folder), name, trust_remote_code=model.get("trust_remote_code", False))


def _check_tree_context(config: dict) -> None:
    """A token tree's nodes must fit the target's context (max_position_embeddings) beside
    the longest prompt a dataset lets through (max_prompt_tokens) and max_new_tokens: the
    last step verifies the tree's nodes after them. A dataset without max_prompt_tokens is
    left to the job's own check (`session.check_context`)."""
    drafters = config.get("drafters", {})
    for exp_name, exp in config["experiments"].items():
        trees = [(name, gamma) for entry in exp["methods"] for _, _, name, gamma, _ in _method_variants(entry, exp)
                 if name is not None and "tree" in drafters[name]]
        prompts = [(d, config["datasets"][d]["max_prompt_tokens"]) for d in exp["datasets"] if "max_prompt_tokens" in config["datasets"][d]]
        if not trees or not prompts:
            continue
        try:
            target_config = _target_config(config, exp["target"])
        except ModelError as err:
            raise ConfigError(str(err)) from None
        limit = getattr(target_config, "max_position_embeddings", None)
        if not limit:
            continue
        new_tokens = max(_as_list(exp["max_new_tokens"]))
        dataset, prompt = max(prompts, key=lambda item: item[1])
        for name, gamma in trees:
            nodes = tree_shape(drafters[name]["tree"]).truncated(gamma).nodes
            if prompt + new_tokens + nodes > limit:
                raise ConfigError(f"config key 'drafters.{name}.tree': {nodes} nodes at gamma {gamma} + max_new_tokens {new_tokens} "
                                  f"+ datasets.{dataset}.max_prompt_tokens {prompt} = {prompt + new_tokens + nodes} tokens exceed the "
                                  f"context of {limit} of experiments.{exp_name}.target {exp['target']!r} (max_position_embeddings); "
                                  "use a smaller tree or fewer tokens")


def _check_method(entry: dict, drafters: dict, where: str) -> None:
    method = entry["method"]
    names = _as_list(entry.get("drafter", []))
    if method in DRAFTING_METHODS and not names:
        raise ConfigError(f"config key '{where}.drafter': method {method!r} needs a drafter")
    if method not in DRAFTING_METHODS and names:
        raise ConfigError(f"config key '{where}.drafter': method {method!r} takes no drafter")
    if method not in DRAFTING_METHODS and "gamma" in entry:
        raise ConfigError(f"config key '{where}.gamma': method {method!r} takes no gamma")
    for name in names:
        if name not in drafters:
            raise ConfigError(f"config key '{where}.drafter': drafter {name!r} is not defined under drafters")
        kind = drafters[name]["kind"]
        if method in METHOD_KINDS and kind != METHOD_KINDS[method]:
            raise ConfigError(f"config key '{where}.drafter': method {method!r} needs a drafter of kind {METHOD_KINDS[method]!r}, {name!r} is {kind!r}")
        if method in MODEL_DRAFTER_METHODS and kind in MODEL_FREE_KINDS | HEAD_KINDS:
            raise ConfigError(f"config key '{where}.drafter': method {method!r} needs a model drafter, {name!r} is of kind {kind!r}")


def _check_reference(exp: dict, entry: dict, where_method: str, where: str) -> None:
    """An interleaved AR reference only where it measures what the cell measures alone."""
    method = entry["method"]
    if method not in DRAFTING_METHODS:
        if "reference" in entry:
            raise ConfigError(f"config key '{where_method}.reference': method {method!r} is the AR reference itself")
        return
    key = f"{where_method}.reference" if "reference" in entry else f"{where}.reference"
    if entry.get("reference", exp.get("reference")) != "interleaved":
        return
    if any(load["mode"] == "open" for load in _as_list(exp["load"])):
        raise ConfigError(f"config key '{key}': interleaved runs AR between the method's requests, which would delay "
                          "an open load's arrivals and change what it measures; use reference: separate with open loads")
    for engine in map(engine_class, _as_list(entry.get("engine", exp["engine"]))):
        if not engine.interleaves:
            raise ConfigError(f"config key '{key}': interleaved decodes the method and AR in one process on one loaded target; "
                              f"{engine.interleave_reason}; use reference: separate")


def _check_replay(exp: dict, entry: dict, drafters: dict, where: str) -> None:
    """A replay drafter replays the AR outputs of our engine's greedy AR cell of the same
    experiment: it needs greedy decoding and that cell in the matrix."""
    replays = [name for name in _as_list(entry.get("drafter", [])) if drafters[name]["kind"] == "replay"]
    if not replays:
        return
    if any(t != 0 for t in _as_list(exp["temperature"])):
        raise ConfigError(f"config key '{where}.drafter': replay drafter {replays[0]!r} is greedy only (temperature 0): "
                          "under sampling its error_rate would not set the acceptance rate")
    replaying = lambda e: any(engine_class(name).replays for name in _as_list(e.get("engine", exp["engine"])))
    if not any(e["method"] == "ar" and replaying(e) for e in exp["methods"]):
        raise ConfigError(f"config key '{where}.drafter': replay drafter {replays[0]!r} replays the outputs of our engine's AR cell; "
                          f"add {{method: ar}} (engine {REFERENCE}) to this experiment's methods")


def _placement_dict(placement: str | dict) -> dict:
    return {"strategy": placement} if isinstance(placement, str) else dict(placement)


# ----------------------------------------------------------------------- matrix


def _model(name: str, spec: dict) -> ModelSpec:
    return ModelSpec(name=name, **spec)


# Where a learned head comes from: a checkpoint, the pipeline's training, another head drafter.
HEAD_ORIGINS = ("source", "train", "head")
# The drafters that grow static token trees (decoding.trees) and EAGLE-2's dynamic trees, and
# a config's tree as what grows it.
TREE_KINDS = frozenset({"model", "quantized", "ngram", "suffix", "recycling", "eagle3", "medusa"})
DYNAMIC_TREE_KINDS = frozenset({"model", "quantized", "eagle3"})
# Checks that a static tree has no node the drafter could never fill (ValueError).
TREE_REACH = {"suffix": lambda shape, d: suffix.check_tree(shape, d["max_depth"], d["max_spec_factor"]),
              "recycling": lambda shape, d: recycling.check_tree(shape, d["top_k"])}


def tree_shape(tree: dict) -> TreeShape | DynamicTree:
    if "dynamic" in tree:
        return DynamicTree(**tree["dynamic"])
    return TreeShape.from_branching(tree["branching"]) if "branching" in tree else TreeShape.of(tree["paths"])


def _drafter(name: str, spec: dict, config: dict) -> DrafterSpec:
    fields = dict(spec)
    if "tree" in spec:
        fields["tree"] = DynamicTreeSpec(**spec["tree"]["dynamic"]) if "dynamic" in spec["tree"] else tree_shape(spec["tree"]).paths
    if "model" in spec:
        fields["model"] = _model(spec["model"], config["models"][spec["model"]])
    owner, origin = _head_owner(config["drafters"], name)
    fields.pop("head", None)
    if "source" in origin:
        fields["source"] = origin["source"]
    if "train" in origin:
        target = next(iter(_head_targets(config)[owner]), None)
        fields |= {"source": head_folder(config, owner),
                   "train": HeadTraining.from_dict(origin["train"] | {"target": target}) if target else None}
    return DrafterSpec(name=name, **fields)


def _placement(entry: str | dict) -> Placement:
    fields = _placement_dict(entry)
    if "ratio" in fields:
        fields["ratio"] = tuple(fields["ratio"])
    return Placement(**fields)


def _method_variants(entry: dict, exp: dict) -> list[tuple[str, str, str | None, int, str | None]]:
    """(engine, method, drafter, gamma, reference) of one `methods` entry; its own `engine`
    and `reference` override the experiment's (a reference not given is None: the default)."""
    method = entry["method"]
    drafters = _as_list(entry.get("drafter", [None]))
    gammas = _as_list(entry.get("gamma", DEFAULT_GAMMA)) if method in DRAFTING_METHODS else [0]
    reference = entry.get("reference", exp.get("reference"))
    return [(e, method, d, g, reference) for e in _as_list(entry.get("engine", exp["engine"])) for d in drafters for g in gammas]


# The default reference where interleaving is possible: chosen from the measurement in
# docs/methodology.md, "Interleaved AR reference" (cpu, on a machine shared with other
# work); on GPUs unmeasured, so the cheaper separate AR cell.
DEFAULT_REFERENCE = {"cpu": "interleaved"}


def _reference(given: str | None, method: str, engine: str, placement: Placement, load: Load) -> str:
    """A cell's reference: `separate` for AR (it is the reference), else the one given, else
    the default of its placement where interleaving can run (a closed load, an engine that
    interleaves)."""
    if method not in DRAFTING_METHODS:
        return "separate"
    if given is not None:
        return given
    if load.is_open or not engine_class(engine).interleaves:
        return "separate"
    return DEFAULT_REFERENCE.get(placement.strategy, "separate")


def expand_matrix(config: dict) -> list[Cell]:
    """All benchmark cells of all experiments of a validated config."""
    models = config["models"]
    drafters = {name: _drafter(name, spec, config) for name, spec in config.get("drafters", {}).items()}
    power = Power(**config["power"])
    cells = []
    for exp_name, exp in config["experiments"].items():
        target = _model(exp["target"], models[exp["target"]])
        axes = itertools.product(
            exp["datasets"],
            [v for entry in exp["methods"] for v in _method_variants(entry, exp)],
            _as_list(exp["batch_size"]),
            _as_list(exp["max_new_tokens"]),
            _as_list(exp["temperature"]),
            [_placement(p) for p in _as_list(exp["placement"])],
            [Load(**load) for load in _as_list(exp["load"])],
            range(exp["repeats"]),
        )
        for dataset, (engine, method, drafter, gamma, reference), batch, max_new, temp, placement, load, repeat in axes:
            generation = Generation(max_new_tokens=max_new, temperature=float(temp), top_k=exp["top_k"], top_p=float(exp["top_p"]))
            cells.append(Cell(
                experiment=exp_name, dataset=dataset, target=target, method=method,
                drafter=drafters[drafter] if drafter else None, gamma=gamma, batch_size=batch,
                generation=generation, placement=placement, load=load, repeat=repeat,
                seed=config["seed"] + repeat, warmup=exp["warmup"], timeout_s=exp.get("timeout_s"), power=power,
                engine=engine, attribution=exp["attribution"],
                reference=_reference(reference, method, engine, placement, load),
                endpoint=_endpoint(config, engine),
            ))
    _check_unique(cells)
    return cells


def _endpoint(config: dict, engine: str) -> Endpoint | None:
    """The running server an engine that measures one is pointed at (config key `openai`)."""
    if not engine_class(engine).needs_endpoint:
        return None
    server = dict(config.get("openai", {}))
    serve = server.pop("serve", None)
    if serve is not None:
        if "base_url" in server:
            raise ConfigError("config key 'openai.serve': the job starts the server on loopback; drop openai.base_url")
        return Endpoint(**server | {"base_url": None, "model": server.get("model", "target"), "serve": True,
                                    "serve_args": tuple(serve["args"]), "startup_timeout_s": serve["startup_timeout_s"],
                                    "serve_gpus": _serve_gpus(serve["args"])})
    for key in ("base_url", "model"):
        if key not in server:
            raise ConfigError(f"config key 'openai.{key}': engine {engine!r} measures a running server and needs it "
                              "(or openai.serve, to let the job start one)")
    return Endpoint(**server)


# vLLM's flags that multiply the GPUs one server spans (its argparse takes `_` for `-` too).
PARALLEL_FLAGS = {"--tensor-parallel-size": "-tp", "--pipeline-parallel-size": "-pp", "--data-parallel-size": "-dp"}


def _serve_gpus(args: list[str]) -> int:
    """The GPUs a started vLLM server spans: the product of its tensor, pipeline and data
    parallel sizes in `openai.serve.args` (`--tensor-parallel-size 4`, `-tp=4`, ...); 0, the
    CPU, when none is given (so `--tensor-parallel-size 1` asks for one GPU)."""
    sizes = {}
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        flag = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
        for long, short in PARALLEL_FLAGS.items():
            if flag in (long, short):
                value = value or (args[i + 1] if i + 1 < len(args) else "")
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"config key 'openai.serve.args': {long} takes a whole number of at least 1, got {value!r}")
                sizes[long] = int(value)
    return math.prod(sizes.values()) if sizes else 0


def _check_unique(cells: list[Cell]) -> None:
    seen: set[str] = set()
    for cell in cells:
        if cell.id in seen:
            raise ConfigError(f"config key 'experiments.{cell.experiment}': two cells resolve to the same id {cell.id!r}")
        seen.add(cell.id)


def experiments_to_run(config: dict) -> list[str]:
    """What the default target builds: `run:`, else every experiment without `default_target: false`."""
    return config.get("run") or [name for name, exp in config["experiments"].items() if exp["default_target"]]


def reference_cell(cell: Cell, cells: list[Cell], engine: str | None = None) -> Cell | None:
    """The AR cell whose greedy outputs `cell` must reproduce exactly, run by `engine`: by
    default the cell's own (a drafting cell is lossless), or another (engine parity, for any
    method). Same experiment, dataset, target, generation and repeat; preferably the same
    batch shape, placement and load too, so that the numerics match."""
    engine = engine or cell.engine
    # An interleaved cell's own job decodes its AR reference (measure.py); a replay drafter
    # still needs the AR cell's outputs before it decodes, to replay them.
    replays = cell.drafter is not None and cell.drafter.measurement_tool
    if not cell.greedy or (engine == cell.engine and (not cell.drafts or (cell.interleaved and not replays))):
        return None
    candidates = [
        c for c in cells
        if c.method == "ar" and c.engine == engine
        and (c.experiment, c.dataset, c.target, c.generation, c.repeat) == (cell.experiment, cell.dataset, cell.target, cell.generation, cell.repeat)
    ]
    candidates.sort(key=lambda c: (c.batch_size != cell.batch_size, c.placement != cell.placement, c.load != cell.load))
    return candidates[0] if candidates else None
