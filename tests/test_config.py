import copy
from pathlib import Path

import pytest
import yaml

from specdec.config import ConfigError, expand_matrix, load_config, reference_cell, validate

REPO = Path(__file__).resolve().parents[1]
GPU8 = REPO / "tests" / "fixtures" / "configs" / "gpu8.yaml"


@pytest.fixture
def default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_expands_to_named_cells():
    cells = expand_matrix(load_config(REPO / "config.yaml"))
    names = [c["cell"] for c in cells]
    assert "humaneval--ar--b1-n64-t0-cpu--r0" in names
    assert "sample--speculative-int8-g4--b1-n64-t0-cpu--r0" in names
    assert "sample--ngram-ngram-g4--b1-n64-t0-cpu--r0" in names
    assert len(names) == len(set(names)) == 8


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


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c.update(unknown=1), "<top level>"),
        (lambda c: c["experiments"]["default"].update(batch_size="four"), "experiments.default.batch_size"),
        (lambda c: c["experiments"]["default"].update(target="nope"), "experiments.default.target"),
        (lambda c: c["experiments"]["default"]["datasets"].append("nope"), "experiments.default.datasets"),
        (lambda c: c["experiments"]["default"]["methods"][1].update(drafter="nope"), "experiments.default.methods.1.drafter"),
        (lambda c: c["experiments"]["default"]["methods"][0].update(gamma=4), "experiments.default.methods.0.gamma"),
        (lambda c: c["experiments"]["default"]["methods"][1].update(gamma=0), "experiments.default.methods.1.gamma"),
        (lambda c: c["experiments"]["default"].update(temperature=-1), "experiments.default.temperature"),
        (lambda c: c["experiments"]["default"].update(repeats=0), "experiments.default.repeats"),
        (lambda c: c["experiments"]["default"].update(placement="everywhere"), "experiments.default.placement"),
        (lambda c: c["experiments"]["default"].update(load={"mode": "open", "rate": 0, "num_requests": 3}), "experiments.default.load"),
        (lambda c: c["experiments"]["default"].update(load={"mode": "open", "rate": 1}), "experiments.default.load"),
        (lambda c: c["models"]["smollm2"].update(source="local"), "models.smollm2"),
        (lambda c: c["drafters"]["ngram"].update(n=3, min_context=3), "drafters.ngram.min_context"),
        (lambda c: c["models"]["smollm2"].update(dtype="bfloat16"), "experiments.default.methods.1.drafter"),  # int8 of a bf16 target
        (lambda c: c.update(results_dir="../elsewhere"), "results_dir"),
        (lambda c: c.update(results_dir="/tmp/elsewhere"), "results_dir"),
    ],
)
def test_bad_config_names_the_key(default_config, mutate, key):
    mutate(default_config)
    with pytest.raises(ConfigError) as info:
        validate(default_config)
    assert f"'{key}" in str(info.value)


def test_ngram_method_needs_an_ngram_drafter(default_config):
    default_config["experiments"]["default"]["methods"].append({"method": "ngram", "drafter": "int8"})
    with pytest.raises(ConfigError, match="needs an ngram drafter"):
        validate(default_config)


def test_gpu8_example_matrix():
    cells = expand_matrix(load_config(GPU8))
    sweep = [c for c in cells if c["experiment"] == "gamma_sweep"]
    # 2 datasets x (1 ar + 4 spec + 2 ngram + 1 assisted + 1 lookup) x 2 placements x 3 repeats
    assert len(sweep) == 2 * 9 * 2 * 3
    load = [c for c in cells if c["experiment"] == "batch_and_load"]
    assert len(load) == 2 * 3 * 2 * 2 * 3
    names = {c["cell"] for c in load}
    assert "mtbench--speculative-llama1b-g4--b16-n64-t0.8-p0.95-multi_gpu_ratio3x1-rate4-gamman64--r0" in names
    assert all(c["seed"] == 7 + c["repeat"] for c in cells)


def test_reference_cell_matches_greedy_settings():
    cells = expand_matrix(load_config(GPU8))
    spec = next(c for c in cells if c["method"] == "speculative" and c["batch_size"] == 4 and c["temperature"] == 0
                and c["experiment"] == "batch_and_load" and c["load"]["mode"] == "closed" and c["placement"]["strategy"] == "auto")
    ref = reference_cell(spec, cells)
    assert ref["method"] == "ar" and ref["batch_size"] == 4 and ref["placement"] == spec["placement"]
    assert ref["dataset"] == spec["dataset"] and ref["repeat"] == spec["repeat"]
    sampled = dict(copy.deepcopy(spec), temperature=0.8)
    assert reference_cell(sampled, cells) is None


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
