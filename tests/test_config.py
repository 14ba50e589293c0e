import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import alias_bomb, tiny_llama

from specdec.engines import unsupported
from specdec.gate.cells import Cell, DynamicTreeSpec, Load
from specdec.gate.config import (
    ConfigError,
    check_inputs,
    experiments_using,
    expand_matrix,
    head_jobs,
    load_config,
    read_yaml,
    reference_cell,
    validate,
)
from specdec.records import RecordError, cell_from_dict, head_job_from_json

REPO = Path(__file__).resolve().parents[1]
GPU8 = REPO / "tests" / "fixtures" / "configs" / "gpu8.yaml"


@pytest.fixture
def default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_expands_to_named_cells():
    cells = [c for c in expand_matrix(load_config(REPO / "config.yaml")) if c.experiment == "default"]
    names = [c.name for c in cells]
    assert "humaneval--specdec-ar--b1-n32-t0-cpu--r0" in names
    assert "sample--specdec-speculative-int8-g4--b1-n32-t0-cpu--r0" in names
    assert "sample--specdec-ngram-ngram-g4--b1-n32-t0-cpu--r0" in names
    assert len(names) == len(set(names)) == 10
    ar = next(c for c in cells if c.method == "ar")
    assert ar.gamma == 0 and ar.drafter is None and not ar.drafts and ar.greedy
    assert ar.id == f"default/{ar.name}" and ar.group_id == "default/humaneval--specdec-ar--b1-n32-t0-cpu"


def test_cells_are_frozen_and_round_trip_through_json():
    for cell in expand_matrix(load_config(GPU8)):
        assert Cell.from_dict(cell.to_dict()) == cell
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.gamma = 3


def test_defaults_are_filled(default_config):
    del default_config["power"]
    config = validate(default_config)
    assert config["power"] == {"enabled": True, "interval_ms": 100, "idle_s": 2}
    assert config["results_dir"] == "results"


def test_ngram_defaults_fill_only_ngram_drafters(default_config):
    default_config["drafters"]["ngram"] = {"kind": "ngram"}
    drafters = validate(default_config)["drafters"]
    assert drafters["ngram"] == {"kind": "ngram", "n": 5, "min_context": 2, "top_k": 1}
    assert drafters["int8"] == {"kind": "quantized", "dtype": "int8"}


def _method(i, **changes):
    return lambda c: c["experiments"]["default"]["methods"][i].update(changes)


def _experiment(**changes):
    return lambda c: c["experiments"]["default"].update(changes)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c.update(unknown=1), "<top level>"),
        (_experiment(batch_size="four"), "experiments.default.batch_size"),
        (_experiment(target="nope"), "experiments.default.target"),
        (lambda c: c["experiments"]["default"]["datasets"].append("nope"), "experiments.default.datasets"),
        (_method(1, drafter="nope"), "experiments.default.methods.1.drafter"),
        (_method(0, gamma=4), "experiments.default.methods.0.gamma"),
        (_method(1, gamma=0), "experiments.default.methods.1.gamma"),
        # gamma is bounded: at most cells.GAMMA_MAX draft tokens per step
        (_method(1, gamma=1000), "experiments.default.methods.1.gamma"),
        (_experiment(temperature=-1), "experiments.default.temperature"),
        (_experiment(temperature=float("nan")), "experiments.default.temperature"),
        (_experiment(temperature=float("inf")), "experiments.default.temperature"),
        (_experiment(top_p=float("nan")), "experiments.default.top_p"),
        (_experiment(repeats=0), "experiments.default.repeats"),
        (_experiment(placement="everywhere"), "experiments.default.placement"),
        (_experiment(load={"mode": "open", "rate": 0, "num_requests": 3}), "experiments.default.load"),
        (_experiment(load={"mode": "open", "rate": 1}), "experiments.default.load"),
        (_experiment(load={"mode": "open", "rate": 1, "num_requests": 3, "duration_s": 5}), "experiments.default.load"),
        (_experiment(load={"mode": "open", "rate": 1, "num_requests": 3, "burstiness": 0.5}), "experiments.default.load"),
        (_experiment(load={"mode": "closed", "rate": 1}), "experiments.default.load"),
        (lambda c: c["models"]["smollm2"].update(source="local"), "models.smollm2"),
        (lambda c: c["drafters"]["ngram"].update(n=3, min_context=3), "drafters.ngram.min_context"),
        (lambda c: c["drafters"]["ngram"].update(compile=True), "drafters.ngram.compile"),  # no model to compile
        (lambda c: c["drafters"]["ngram"].update(cache_tokens=100), "drafters.ngram"),  # a suffix drafter's key
        (lambda c: c["drafters"]["suffix"].update(top_k=2), "drafters.suffix"),  # an ngram or recycling drafter's key
        (lambda c: c["drafters"]["suffix"].update(max_spec_factor=0.0), "drafters.suffix.max_spec_factor"),
        (_method(2, method="suffix"), "experiments.default.methods.2.drafter"),  # the ngram drafter
        (_method(1, method="recycling"), "experiments.default.methods.1.drafter"),  # model drafters
        (lambda c: c["models"]["smollm2"].update(compile="yes"), "models.smollm2.compile"),
        (lambda c: c["models"]["smollm2"].update(dtype="bfloat16"), "experiments.default.methods.1.drafter"),  # int8 of a bf16 target
        (_experiment(placement="same"), "experiments.default.placement"),  # int8 runs on the CPU only
        (lambda c: c.update(results_dir="../elsewhere"), "results_dir"),
        (lambda c: c.update(results_dir="/tmp/elsewhere"), "results_dir"),
        (lambda c: c.update(results_dir=""), "results_dir"),
        (lambda c: c.update(results_dir="~/x"), "results_dir"),
        (lambda c: c.update(results_dir="a/../../b"), "results_dir"),
        (lambda c: c["datasets"].update({"a/b": {"source": "sample"}}), "datasets"),
        (lambda c: c["datasets"].update({"..": {"source": "sample"}}), "datasets"),
        (lambda c: c["datasets"].update({"x$(touch PWNED)y": {"source": "sample"}}), "datasets"),
        (lambda c: c["drafters"].update({"my drafter": {"kind": "ngram"}}), "drafters"),
        (lambda c: c["models"].update({"m;rm": {"source": "embedded"}}), "models"),
        (lambda c: c["experiments"].update({"e/x": c["experiments"]["default"]}), "experiments"),
        (lambda c: c.update(plots={"colour": "red"}), "plots"),
        (lambda c: c.update(plots={"dpi": "high"}), "plots.dpi"),
        (lambda c: c.update(aggregate={"confidence": 1.5}), "aggregate.confidence"),
    ],
)
def test_bad_config_names_the_key(default_config, mutate, key):
    mutate(default_config)
    with pytest.raises(ConfigError) as info:
        validate(default_config)
    assert f"'{key}" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_config_cannot_name_the_program_vllm_cells_run(default_config):
    default_config["vllm"] = {"venv": "/any/path"}
    with pytest.raises(ConfigError, match=r"^config key 'vllm': removed: a config does not name a program to run .*SPECDEC_VLLM_VENV"):
        validate(default_config)


def test_ngram_method_needs_an_ngram_drafter(default_config):
    default_config["experiments"]["default"]["methods"].append({"method": "ngram", "drafter": "int8"})
    with pytest.raises(ConfigError, match="needs a drafter of kind 'ngram'"):
        validate(default_config)


def test_a_key_given_twice_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "config.yaml"
    text = (REPO / "config.yaml").read_text()
    path.write_text(text + "\nexperiments:\n  other: {}\n")
    line = text.count("\n") + 2
    with pytest.raises(ConfigError, match=rf"config.yaml:{line}:1: key 'experiments' appears twice \(first on line \d+\)"):
        load_config(path)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("seed: 1\nmodels: {a: [\n")
    with pytest.raises(ConfigError, match=r"config.yaml:3:1: "):
        read_yaml(path)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text((REPO / "config.yaml").read_text() + alias_bomb())
    with pytest.raises(ConfigError, match=r"config.yaml: its aliases \(\*name\) expand it to more than 100,000 values"):
        read_yaml(path)
    path.write_text("seed: 1\nloop: &loop [1, *loop]\n")
    with pytest.raises(ConfigError, match=r"config.yaml:2:\d+: an alias refers to a value that holds it"):
        read_yaml(path)


def test_open_loop_cells_differing_only_in_size_or_shape_get_distinct_ids(default_config):
    default_config["experiments"]["default"]["load"] = [
        {"mode": "open", "rate": 2, "num_requests": 8},
        {"mode": "open", "rate": 2, "num_requests": 16},
        {"mode": "open", "rate": 2, "duration_s": 30},
        {"mode": "open", "rate": 2, "arrival": "gamma", "burstiness": 0.5, "num_requests": 8},
        {"mode": "open", "rate": 2, "arrival": "gamma", "burstiness": 2, "num_requests": 8},
        {"mode": "closed", "num_requests": 3},
    ]
    cells = expand_matrix(validate(default_config))
    ar = [c for c in cells if c.method == "ar" and c.dataset == "sample" and c.experiment == "default"]
    assert len({c.group_id for c in ar}) == 6
    assert {c.load for c in ar} >= {Load("open", 2, num_requests=8), Load("closed", num_requests=3)}


def test_gpu8_example_matrix():
    cells = expand_matrix(load_config(GPU8))
    sweep = [c for c in cells if c.experiment == "gamma_sweep"]
    # 2 datasets x (1 ar + 4 spec + 2 ngram + 2 other engines' spec + 1 transformers' ngram) x 2 placements x 3 repeats
    assert len(sweep) == 2 * 10 * 2 * 3
    load = [c for c in cells if c.experiment == "batch_and_load"]
    assert len(load) == 2 * 3 * 2 * 2 * 3
    names = {c.name for c in load}
    assert "mtbench--specdec-speculative-llama1b-g4--b16-n64-t0.8-p0.95-multi_gpu_ratio3x1-rate4-gamma0.5n64--r0" in names
    assert all(c.seed == 7 + c.repeat for c in cells)
    assert {c.gamma for c in cells if c.method == "ar"} == {0}
    lookup = next(c for c in sweep if c.engine == "transformers" and c.method == "ngram")
    assert lookup.drafter.name == "ngram" and lookup.gamma == 4
    assert lookup.name.startswith("mtbench--transformers-ngram-ngram-g4--")
    assert {c.engine for c in sweep if c.method == "speculative" and c.gamma == 4} == {"specdec", "transformers", "vllm"}
    served = [c for c in cells if c.experiment == "served"]
    assert {c.engine for c in served} == {"openai"} and {c.endpoint.serve_gpus for c in served} == {4}


def test_reference_cell_matches_greedy_settings():
    cells = expand_matrix(load_config(GPU8))
    spec = next(c for c in cells if c.method == "speculative" and c.batch_size == 4 and c.greedy
                and c.experiment == "batch_and_load" and not c.load.is_open and c.placement.strategy == "auto")
    ref = reference_cell(spec, cells)
    assert ref.method == "ar" and ref.batch_size == 4 and ref.placement == spec.placement
    assert ref.dataset == spec.dataset and ref.repeat == spec.repeat
    assert ref.group_id == spec.ar_counterpart().group_id
    sampled = dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, temperature=0.8))
    assert reference_cell(sampled, cells) is None


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("load", [
    {"mode": "open", "rate": 0, "num_requests": 3},
    {"mode": "open", "rate": -1, "num_requests": 3},
    {"mode": "open", "rate": 1, "duration_s": 0},
    {"mode": "open", "rate": 1, "num_requests": 0},
    {"mode": "open", "rate": 1, "num_requests": 2.5},
    {"mode": "open", "rate": 1, "num_requests": 2, "arrival": "gamma", "burstiness": 0},
    {"mode": "open", "rate": 1, "num_requests": 2, "burstiness": 2.0},
    {"mode": "open", "num_requests": 2},
    {"mode": "open", "rate": 1, "num_requests": 2, "arrival": "uniform"},
    {"mode": "closed", "num_requests": 0},
    {"mode": "batch"},
])
def test_a_load_that_cannot_run_fails_at_the_gate(default_config, load):
    default_config["experiments"]["default"]["load"] = [{"mode": "closed"}, load]
    with pytest.raises(ConfigError, match=r"'experiments\.default\.load"):
        validate(default_config)


@pytest.mark.parametrize("placement", [
    "tensor_parallel",
    {"strategy": "separate", "gpus": 3},
    {"strategy": "multi_gpu_ratio", "ratio": [3]},
    {"strategy": "multi_gpu_ratio"},
    {"strategy": "same", "ratio": [1, 1]},
    {"strategy": "same", "max_memory_fraction": 1.5},
    {"strategy": "cpu", "max_memory_fraction": 0.5},
])
def test_a_placement_setting_its_strategy_does_not_take_fails_at_the_gate(default_config, placement):
    default_config["drafters"] = {"ngram": default_config["drafters"]["ngram"]}
    default_config["experiments"]["default"]["methods"] = [{"method": "ar"}]
    default_config["experiments"]["default"]["placement"] = placement
    with pytest.raises(ConfigError, match=r"'experiments\.default\.placement"):
        validate(default_config)


def configuration_page_block(heading: str) -> str:
    """The YAML block under `heading` in docs/configuration.md."""
    text = (REPO / "docs" / "configuration.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_configuration_page_shows_the_shipped_config_and_only_known_keys():
    shipped, reference = configuration_page_block("The shipped `config.yaml`"), configuration_page_block("Every key")
    assert shipped == (REPO / "config.yaml").read_text()  # the comments too
    assert yaml.safe_load(shipped) == yaml.safe_load((REPO / "config.yaml").read_text())
    assert [c.id for c in expand_matrix(validate(yaml.safe_load(shipped)))] == [c.id for c in expand_matrix(load_config(REPO / "config.yaml"))]
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert set(yaml.safe_load(reference)) <= set(schema["properties"])


def _with_replay(config, **drafter):
    config["drafters"]["replay80"] = {"kind": "replay", "error_rate": 0.2, **drafter}
    config["experiments"]["default"]["methods"].append({"method": "speculative", "drafter": "replay80", "gamma": 4})
    return config


def test_a_replay_drafter_is_a_typed_measurement_tool(default_config):
    from specdec.report.aggregate import method_label

    config = validate(_with_replay(default_config, cost_ms_per_token=2))
    assert config["drafters"]["replay80"] == {"kind": "replay", "error_rate": 0.2, "cost_ms_per_token": 2}
    assert "cost_ms_per_token" not in config["drafters"]["int8"]  # its default only on replay drafters
    cell = next(c for c in expand_matrix(config) if c.drafter and c.drafter.name == "replay80")
    assert cell.drafter.measurement_tool and cell.drafter.error_rate == 0.2 and cell.drafter_model is None
    assert method_label(cell) == "replay (measurement tool: replay80)"
    assert Cell.from_dict(cell.to_dict()) == cell
    paced = validate(_with_replay(yaml.safe_load((REPO / "config.yaml").read_text()), model="smollm2"))
    cell = next(c for c in expand_matrix(paced) if c.drafter and c.drafter.name == "replay80")
    assert cell.drafter_model.name == "smollm2"


@pytest.mark.parametrize(
    "mutate, key, message",
    [
        (lambda c: c["drafters"]["replay80"].pop("error_rate"), "drafters.replay80", "error_rate"),
        (lambda c: c["drafters"]["replay80"].update(error_rate=1.5), "drafters.replay80.error_rate", None),
        (lambda c: c["drafters"]["replay80"].update(cost_ms_per_token=-1), "drafters.replay80.cost_ms_per_token", None),
        (lambda c: c["drafters"]["replay80"].update(model="nope"), "drafters.replay80.model", "not defined"),
        (lambda c: c["drafters"]["replay80"].update(model="smollm2", cost_ms_per_token=2), "drafters.replay80.cost_ms_per_token", "not both"),
        (lambda c: c["drafters"]["int8"].update(error_rate=0.1), "drafters.int8", None),
        (_experiment(temperature=0.7), "experiments.default.methods.4.drafter", "greedy only"),
        (lambda c: c["experiments"]["default"]["methods"].pop(0), "experiments.default.methods.3.drafter", "AR cell"),
    ],
)
def test_bad_replay_settings_fail_at_the_gate(default_config, mutate, key, message):
    config = _with_replay(default_config)
    mutate(config)
    with pytest.raises(ConfigError, match=message) as info:
        validate(config)
    assert f"'{key}" in str(info.value)


def test_a_replay_cell_on_another_engine_is_not_supported(default_config):
    cell = next(c for c in expand_matrix(validate(_with_replay(default_config))) if c.drafter and c.drafter.kind == "replay")
    assert "measurement tool" in unsupported(dataclasses.replace(cell, engine="transformers"))
    assert unsupported(cell) is None


def _other_target(config):
    config["models"]["other"] = {"source": "embedded"}
    config["experiments"]["heads"]["target"] = "other"


@pytest.mark.parametrize(
    "mutate, key, message",
    [
        (lambda c: c["drafters"]["eagle"].pop("train"), "drafters.eagle", "or from another head drafter \\(head: NAME\\); give one of them"),
        (lambda c: c["drafters"]["eagle"].update(source="some/head"), "drafters.eagle", "give one of source and train"),
        (lambda c: c["drafters"]["eagle_tree"].update(train={"tokens": 5000}), "drafters.eagle_tree", "give one of train and head"),
        (lambda c: c["drafters"]["eagle_tree"].update(head="medusa"), "drafters.eagle_tree.head",
         "'medusa' is not a eagle3 drafter with a source or train of its own; eagle3 heads here: eagle, eagle_100k"),
        (lambda c: c["drafters"]["eagle_tree"].update(head="eagle_eagle2"), "drafters.eagle_tree.head", "not a eagle3 drafter"),
        (lambda c: c["drafters"]["ngram"].update(head="eagle"), "drafters.ngram.head", "only a learned head"),
        (lambda c: c["drafters"]["ngram"].update(source="some/head"), "drafters.ngram.source", "only a learned head"),
        (lambda c: c["drafters"]["eagle"]["train"].update(tokens=10.0), "drafters.eagle.train.tokens", "integer"),
        (lambda c: c["drafters"]["eagle"]["train"].update(corpus=["wikipedia"]), "drafters.eagle.train.corpus.0", None),
        (lambda c: c["experiments"]["default"]["methods"].append({"method": "eagle3", "drafter": "ngram"}),
         "experiments.default.methods.4.drafter", "needs a drafter of kind 'eagle3'"),
        (lambda c: c["experiments"]["default"]["methods"].append({"method": "speculative", "drafter": "eagle"}),
         "experiments.default.methods.4.drafter", "needs a model drafter"),
        (lambda c: (_other_target(c), c["experiments"]["heads"]["methods"][1].update(drafter="eagle")),
         "drafters.eagle.train", "trained for one target"),
    ],
)
def test_bad_head_settings_fail_at_the_gate(default_config, mutate, key, message):
    mutate(default_config)
    with pytest.raises(ConfigError, match=message) as info:
        validate(default_config)
    assert f"'{key}" in str(info.value)


def test_a_trained_head_is_a_typed_job_whose_cells_read_the_folder_it_writes(default_config):
    job = head_jobs(validate(default_config))["eagle"]
    assert job.drafter.train.tokens == 40000 and job.target.name == "smollm2" and job.seed == default_config["seed"]
    assert job.drafter.source == "results/heads/eagle"
    assert head_job_from_json(json.dumps(job.to_dict()), "test") == job
    cell = next(c for c in expand_matrix(default_config) if c.method == "eagle3" and c.experiment == "default")
    assert cell.drafter == job.drafter and cell.drafter_model is None
    assert Cell.from_dict(json.loads(json.dumps(cell.to_dict()))) == cell
    assert "train" not in next(c for c in expand_matrix(default_config) if c.method == "ngram").to_dict()["drafter"]
    with pytest.raises(RecordError, match="test: \\$.drafter.kind"):
        head_job_from_json(json.dumps(job.to_dict() | {"drafter": job.to_dict()["drafter"] | {"kind": "ngram"}}), "test")


def test_a_drafter_that_borrows_a_head_drafts_with_its_training_and_folder(default_config):
    """`head: eagle`: a tree on the chain's head, trained once (one job), read from its folder;
    the head's training text keeps clear of the borrowers' datasets too."""
    config = validate(default_config)
    config["experiments"]["trees"]["datasets"] = ["humaneval", "code_edit"]
    jobs = head_jobs(config)
    assert "eagle_tree" not in jobs and "eagle_eagle2" not in jobs
    cells = {c.drafter.name: c for c in expand_matrix(config) if c.experiment == "trees" and c.drafter is not None}
    assert cells["eagle_tree"].drafter.source == cells["eagle"].drafter.source == "results/heads/eagle"
    assert cells["eagle_tree"].drafter.train == jobs["eagle"].drafter.train
    assert cells["eagle_tree"].drafter.tree == ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1),
                                                (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0))
    assert "code_edit" in {d for exp in experiments_using(config, "eagle") for d in exp["datasets"]}


def test_a_checkpoint_that_does_not_fit_the_target_is_refused_at_the_gate(default_config, tmp_path, embedded_model_dir):
    """A head named by `source` is read (config only) against its target before anything runs."""
    folder = tmp_path / "head"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 64,
                                                    "vocab_size": 49152, "num_hidden_layers": 1}))
    default_config["drafters"]["eagle"] = {"kind": "eagle3", "source": str(folder)}
    validate(default_config)
    with pytest.raises(ConfigError, match="'drafters.eagle.source': .*hidden_size 64 does not fit the target \\(hidden_size 576\\)"):
        check_inputs(default_config)


@pytest.mark.parametrize(
    "name, tree, key, message",
    [
        ("ngram", {"paths": [[0], [0, 1]]}, "tree", "tree path \\[0, 1\\] has no elder sibling \\[0, 0\\]"),
        ("ngram", {"paths": [[1]]}, "tree", "tree path \\[1\\] has no elder sibling \\[0\\]"),
        ("ngram", {"paths": [[0], [1], [1, 1, 0], [1, 0]]}, "tree", "tree path \\[1, 1, 0\\] has no parent path \\[1, 1\\]"),
        ("replay", {"branching": [2]}, "tree", "a replay drafter drafts chains here"),
        # nodes the drafter could never fill: a suffix draft is at most int(1.0 x (24 - 1)) deep,
        # a recycled node has top_k = 8 successors
        ("suffix", {"branching": [1] * 24}, "tree", "a tree 24 deep reaches past the longest draft, .* = 23 tokens"),
        ("recycling", {"branching": [9]}, "tree", "a node with 9 children needs as many successors per token; top_k is 8"),
        ("medusa", {"branching": [2, 2, 1, 1]}, "tree", "4 deep, but a Medusa head drafts one depth per head and this one has 3 "
                                                        "\\(train.num_heads is 3\\)"),
        ("ngram", {"dynamic": {"top_k": 2, "depth": 3, "nodes": 8}}, "tree.dynamic",
         "a ngram drafter drafts static trees or chains here; EAGLE-2's dynamic trees .*: kinds eagle3, model, quantized"),
        ("medusa", {"dynamic": {"top_k": 2, "depth": 3, "nodes": 8}}, "tree.dynamic", "a medusa drafter drafts static trees or chains"),
        ("eagle", {"dynamic": {"top_k": 2, "depth": 2, "nodes": 7}}, "tree.dynamic.nodes",
         "dynamic.nodes 7 exceeds the 6 candidates that top_k 2 and depth 2 grow"),
    ],
)
def test_a_token_tree_is_checked_at_the_gate(default_config, name, tree, key, message):
    default_config["drafters"]["replay"] = {"kind": "replay", "error_rate": 0.2}
    default_config["drafters"][name]["tree"] = tree
    with pytest.raises(ConfigError, match=message) as info:
        validate(default_config)
    assert f"'drafters.{name}.{key}'" in str(info.value)


def test_a_tree_with_more_nodes_than_the_context_leaves_is_refused_at_the_gate(tmp_path):
    """Nodes + max_new_tokens + the dataset's max_prompt_tokens against the target's
    max_position_embeddings (512 for the tiny Llama), read from its folder."""
    tiny_llama(tmp_path / "tiny", 128)
    config = validate({
        "models": {"tiny": {"source": "local", "path": str(tmp_path / "tiny")}},
        "drafters": {"wide": {"kind": "ngram", "tree": {"branching": [8, 2]}}},
        "datasets": {"sample": {"source": "sample", "max_prompt_tokens": 400}},
        "experiments": {"t": {"target": "tiny", "datasets": ["sample"], "max_new_tokens": [16, 90],
                              "methods": [{"method": "ngram", "drafter": "wide", "gamma": [1, 2]}]}},
    })
    with pytest.raises(ConfigError, match="^config key 'drafters.wide.tree': 24 nodes at gamma 2 \\+ max_new_tokens 90 \\+ "
                                          "datasets.sample.max_prompt_tokens 400 = 514 tokens exceed the context of 512 "):
        check_inputs(config)
    config["experiments"]["t"]["methods"][0]["gamma"] = 1  # 8 nodes: 498 tokens fit
    check_inputs(config)


def test_a_medusa_checkpoints_heads_bound_its_tree_at_the_gate(default_config, tmp_path, embedded_model_dir):
    """A Medusa named by `source` is read (config only): its tree reaches one depth per head."""
    folder = tmp_path / "medusa"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": 576,
                                                    "vocab_size": 49152, "num_heads": 2, "num_hidden_layers": 1}))
    default_config["drafters"]["medusa"] = {"kind": "medusa", "source": str(folder), "tree": {"branching": [2, 2, 1]}}
    validate(default_config)
    with pytest.raises(ConfigError, match="'drafters.medusa.tree': 3 deep, but a Medusa head .* has 2 \\(source "):
        check_inputs(default_config)


def test_head_trees_are_typed_in_the_cell_and_run_on_our_engine_only(default_config):
    """A static tree for the heads, a dynamic one for EAGLE-3: carried by the cell through its
    JSON form (schema-checked), not_supported on the other engines (vLLM is handed an EAGLE-3
    head's static tree only: test_engines.py)."""
    default_config["drafters"]["eagle_300k"]["tree"] = {"dynamic": {"top_k": 4, "depth": 4, "nodes": 24}}
    default_config["drafters"]["medusa"]["tree"] = {"paths": [[0], [1], [0, 0]]}
    cells = [c for c in expand_matrix(validate(default_config)) if c.experiment == "heads" and c.drafter is not None]
    dynamic = next(c for c in cells if c.drafter.name == "eagle_300k")
    medusa = next(c for c in cells if c.drafter.name == "medusa")
    assert dynamic.drafter.tree == DynamicTreeSpec(top_k=4, depth=4, nodes=24) and medusa.drafter.tree == ((0,), (1,), (0, 0))
    for cell in (dynamic, medusa):
        assert cell_from_dict(json.loads(json.dumps(cell.to_dict())), "test") == cell
        assert unsupported(cell) is None
        assert unsupported(dataclasses.replace(cell, engine="vllm")) == (
            f"drafter {cell.drafter.name!r} drafts a token tree; vllm takes only an EAGLE-3 head's static tree (vLLM's speculative_token_tree)")
        assert unsupported(dataclasses.replace(cell, engine="transformers")) == (
            f"drafter {cell.drafter.name!r} drafts a token tree; transformers verifies chains here")


def test_the_copying_experiment_puts_our_model_free_drafters_beside_the_peers(default_config):
    """Every dataset on three engines: transformers runs AR and prompt lookup, vLLM AR, ngram
    and suffix (its cells are not_supported at start without arctic-inference); the rest,
    recycling and every tree off our engine, is not_supported at the gate."""
    cells = [c for c in expand_matrix(validate(default_config)) if c.experiment == "copying"]
    runs = {(c.engine, c.drafter.name if c.drafter else "ar") for c in cells if unsupported(c) is None}
    ours = {"ar", "ngram", "suffix", "suffix_tree", "recycling", "recycling_tree"}
    assert runs == {("specdec", d) for d in ours} | {("transformers", "ar"), ("transformers", "ngram"),
                                                      ("vllm", "ar"), ("vllm", "ngram"), ("vllm", "suffix")}
    assert len(cells) == 3 * 3 * len(ours)  # datasets x engines x methods, the same prompts for each


def test_a_token_tree_is_typed_by_its_paths_and_runs_on_our_engine_only(default_config):
    cells = [c for c in expand_matrix(validate(default_config)) if c.experiment == "trees"]
    tree = next(c for c in cells if c.drafter is not None and c.drafter.name == "ngram_tree")
    assert tree.drafter.tree == ((0,), (1,), (2,), (0, 0), (1, 0), (2, 0), (0, 0, 0), (1, 0, 0), (2, 0, 0),
                                 (0, 0, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0))
    assert Cell.from_dict(json.loads(json.dumps(tree.to_dict()))) == tree
    assert unsupported(tree) is None
    assert unsupported(dataclasses.replace(tree, engine="transformers")) == "drafter 'ngram_tree' drafts a token tree; transformers verifies chains here"
    assert unsupported(dataclasses.replace(tree, engine="vllm")) == (
        "drafter 'ngram_tree' drafts a token tree; vllm takes only an EAGLE-3 head's static tree (vLLM's speculative_token_tree)")
