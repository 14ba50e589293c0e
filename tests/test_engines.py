"""The engine axis without running an engine: what each engine is given, what it cannot run,
and how vLLM's counters become ours."""

import ast
import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO

from specdec.gate.config import ConfigError, expand_matrix, load_config, reference_cell, schema_path, validate
from specdec.gate.cells import ENGINES, DrafterSpec, DynamicTreeSpec
from specdec.engines import REFERENCE, REGISTRY, unsupported
from specdec.engines.transformers import transformers_settings
from specdec.engines.vllm import (counter_difference, cpu_environment, engine_args, forget_suffix_outputs, per_request_drafts,
                                  spec_counters)
from specdec.records import schema_path as record_schema_path

CONFIG = {
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {"int8": {"kind": "quantized", "dtype": "int8"}, "bf16": {"kind": "quantized", "dtype": "bf16"},
                 "self": {"kind": "model", "model": "smollm2"}, "ngram": {"kind": "ngram", "n": 5, "min_context": 2}},
    "datasets": {"sample": {"source": "sample"}},
    "experiments": {"e": {
        "target": "smollm2", "datasets": ["sample"], "engine": ["specdec", "transformers", "vllm"],
        "methods": [{"method": "ar"}, {"method": "speculative", "drafter": ["int8", "bf16", "self"], "gamma": 3},
                    {"method": "ngram", "drafter": "ngram", "gamma": 2}],
        "batch_size": [1, 2],
    }},
}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    path = tmp_path_factory.mktemp("engines") / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return {c.name: c for c in expand_matrix(load_config(path))}


def test_the_engine_is_an_axis_and_part_of_the_cell_id(cells):
    assert len(cells) == 3 * (1 + 3 + 1) * 2
    assert "sample--vllm-speculative-self-g3--b2-n64-t0-cpu--r0" in cells
    assert "sample--transformers-ngram-ngram-g2--b1-n64-t0-cpu--r0" in cells


def test_the_registry_names_the_engines_of_the_config_schema():
    assert tuple(REGISTRY) == ENGINES
    config_enums = yaml.safe_load(schema_path().read_text())["definitions"]["engines"]["oneOf"]
    assert [one.get("enum", one.get("items", {}).get("enum")) for one in config_enums] == [list(ENGINES)] * 2
    assert json.loads(record_schema_path("cell").read_text())["properties"]["engine"]["enum"] == list(ENGINES)
    assert all(engine.name == name for name, engine in REGISTRY.items())
    assert REFERENCE == "specdec" and [name for name, e in REGISTRY.items() if e.parity_reference] == [REFERENCE]


def test_only_the_engines_package_tells_engines_apart_by_name():
    """Everything else reads what an engine class declares (docs/engines.md): a comparison
    with an engine's name outside `engines/` is a capability that belongs to its class."""
    found = []
    for path in sorted((REPO / "src" / "specdec").rglob("*.py")):
        if "engines" in path.relative_to(REPO / "src" / "specdec").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                values = [e for o in operands for e in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
                if any(isinstance(v, ast.Constant) and v.value in ENGINES for v in values):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


def test_one_rule_for_what_an_engine_cannot_run(cells):
    gaps = {name: unsupported(cell) for name, cell in cells.items() if unsupported(cell)}
    assert set(gaps) == {
        # transformers drafts at batch size 1 only
        *(f"sample--transformers-{m}--b2-n64-t0-cpu--r0" for m in ("speculative-int8-g3", "speculative-bf16-g3",
                                                                    "speculative-self-g3", "ngram-ngram-g2")),
        # vLLM loads its drafter itself, in the target's dtype
        *(f"sample--vllm-speculative-{d}-g3--b{b}-n64-t0-cpu--r0" for d in ("int8", "bf16") for b in (1, 2)),
    }
    assert "batch size 1 only" in gaps["sample--transformers-ngram-ngram-g2--b2-n64-t0-cpu--r0"]
    assert "int8" in gaps["sample--vllm-speculative-int8-g3--b1-n64-t0-cpu--r0"]
    assert "target's dtype (float32)" in gaps["sample--vllm-speculative-bf16-g3--b1-n64-t0-cpu--r0"]
    cell = cells["sample--vllm-ar--b1-n64-t0-cpu--r0"]
    separate = dataclasses.replace(cell, placement=dataclasses.replace(cell.placement, strategy="separate"))
    assert "places the drafter with the target" in unsupported(separate)


def test_check_config_lists_the_not_supported_cells_before_a_run(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    out = subprocess.run([sys.executable, "-m", "specdec.cli", "check-config", "--config", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "30 cells" in out and "8 cell(s) will be recorded not_supported" in out
    assert "e/sample--vllm-speculative-int8-g3--b1-n64-t0-cpu--r0: vLLM drafts with a model it loads itself" in out


def test_references_lossless_within_an_engine_and_parity_with_ours(cells):
    every = list(cells.values())
    ngram = cells["sample--vllm-ngram-ngram-g2--b1-n64-t0-cpu--r0"]
    assert reference_cell(ngram, every).name == "sample--vllm-ar--b1-n64-t0-cpu--r0"
    assert reference_cell(ngram, every, engine="specdec").name == "sample--specdec-ar--b1-n64-t0-cpu--r0"
    vllm_ar = cells["sample--vllm-ar--b1-n64-t0-cpu--r0"]
    assert reference_cell(vllm_ar, every) is None  # AR is its engine's reference
    assert reference_cell(vllm_ar, every, engine="specdec").engine == "specdec"


def test_the_ngram_drafter_maps_onto_each_engines_prompt_lookup(cells):
    ngram = cells["sample--vllm-ngram-ngram-g2--b1-n64-t0-cpu--r0"]
    args = engine_args(ngram, "models/smollm2", None, 8192, on_gpu=False)
    assert args["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    assert args["per_request_spec_decode_metrics"] == "detailed" and args["enable_prefix_caching"] is False
    assert args["enforce_eager"] and "tensor_parallel_size" not in args
    hf = transformers_settings(cells["sample--transformers-ngram-ngram-g2--b1-n64-t0-cpu--r0"])
    assert hf == {"prompt_lookup_num_tokens": 2, "max_matching_ngram_size": 4}


def test_the_suffix_drafter_maps_onto_vllms_suffix_method(cells):
    base = cells["sample--vllm-ngram-ngram-g2--b1-n64-t0-cpu--r0"]
    spec = DrafterSpec(name="suffix", kind="suffix", max_depth=24, max_spec_factor=1.5, min_token_prob=0.1, cache_tokens=0)
    suffix = dataclasses.replace(base, method="suffix", drafter=spec, gamma=8)
    assert unsupported(suffix) is None and unsupported(dataclasses.replace(suffix, engine="transformers"))
    assert engine_args(suffix, "m", None, 4096, on_gpu=False)["speculative_config"] == {
        "method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_tree_depth": 24,
        "suffix_decoding_max_spec_factor": 1.5, "suffix_decoding_min_token_prob": 0.1,
        "suffix_decoding_max_cached_requests": 0}


class _SuffixCache:
    """arctic-inference's SuffixDecodingCache as vLLM's suffix proposer holds it: the requests
    whose outputs its global tree keeps, evicted one by one."""

    def __init__(self, cached):
        self.cached = dict.fromkeys(cached)

    @property
    def cached_requests(self):
        return self.cached.keys()

    def evict_cached_response(self, request_id):
        del self.cached[request_id]


def test_vllms_suffix_cache_forgets_the_warm_up_outputs_as_ours_does():
    """Run in vLLM's engine process as the window opens (a vLLM worker's model runner holds the
    proposer): every finished request's output leaves the global tree, so the warm-up's answer
    to the first measured prompt cannot draft it (docs/engines.md)."""
    cache = _SuffixCache(["warmup:code_edit/HumanEval/113#1-3f2a", "warmup:code_edit/HumanEval/0#1-9c1d"])
    worker = SimpleNamespace(model_runner=SimpleNamespace(drafter=SimpleNamespace(suffix_cache=cache)))
    assert forget_suffix_outputs(worker) == 2
    assert not cache.cached_requests
    assert forget_suffix_outputs(worker) == 0


def test_learned_heads_run_on_ours_and_as_vllms_methods_of_the_same_name(cells):
    """The head's folder is what vLLM loads, the method named (vLLM would guess it from the
    folder's name); transformers runs no head."""
    base = cells["sample--vllm-speculative-self-g3--b1-n64-t0-cpu--r0"]
    for kind in ("eagle3", "medusa"):
        head = dataclasses.replace(base, method=kind, drafter=DrafterSpec(name="h", kind=kind, source="heads/h"))
        assert unsupported(head) is None and unsupported(dataclasses.replace(head, engine="specdec")) is None
        assert engine_args(head, "m", "/runs/heads/h", 4096, on_gpu=False)["speculative_config"] == {
            "method": kind, "model": "/runs/heads/h", "num_speculative_tokens": 3}
        assert unsupported(dataclasses.replace(head, engine="transformers")) == (
            f"drafter 'h' is a learned {kind} head; transformers runs no such head here")
    # vLLM's Medusa drafts a token with each head: a gamma past its heads drafts as many as it has, as ours does
    assert engine_args(head, "m", "/runs/heads/h", 4096, on_gpu=False, medusa_heads=2)["speculative_config"][
        "num_speculative_tokens"] == 2


def test_an_eagle3_heads_static_tree_goes_to_vllm_as_its_speculative_token_tree(cells):
    """vLLM checks the tree itself when the cell starts (0.32 refuses the key:
    tests/test_vllm.py); a dynamic tree, or a Medusa head's, is not_supported at the gate."""
    base = cells["sample--vllm-speculative-self-g3--b1-n64-t0-cpu--r0"]
    spec = DrafterSpec(name="t", kind="eagle3", source="heads/h", tree=((0,), (1,), (0, 0), (1, 0)))
    eagle = dataclasses.replace(base, method="eagle3", drafter=spec)
    assert unsupported(eagle) is None
    assert engine_args(eagle, "m", "/runs/heads/h", 4096, on_gpu=False)["speculative_config"] == {
        "method": "eagle3", "model": "/runs/heads/h", "num_speculative_tokens": 4,  # a drafted token per node
        "speculative_token_tree": "[(0,), (1,), (0, 0), (1, 0)]"}
    medusa = dataclasses.replace(eagle, method="medusa", drafter=dataclasses.replace(spec, kind="medusa"))
    dynamic = dataclasses.replace(eagle, drafter=dataclasses.replace(spec, tree=DynamicTreeSpec(top_k=2, depth=2, nodes=4)))
    for cell in (medusa, dynamic):
        assert unsupported(cell) == "drafter 't' drafts a token tree; vllm takes only an EAGLE-3 head's static tree (vLLM's speculative_token_tree)"


def test_vllm_engine_args_for_ar_and_a_draft_model_on_gpus(cells):
    ar = cells["sample--vllm-ar--b2-n64-t0-cpu--r0"]
    args = engine_args(ar, "m", None, 4096, on_gpu=False)
    assert "speculative_config" not in args and "per_request_spec_decode_metrics" not in args
    assert (args["max_num_seqs"], args["max_model_len"], args["dtype"]) == (2, 4096, "float32")
    spec = cells["sample--vllm-speculative-self-g3--b1-n64-t0-cpu--r0"]
    on_gpus = dataclasses.replace(spec, placement=dataclasses.replace(spec.placement, strategy="same", gpus=2))
    args = engine_args(on_gpus, "m", "d", 4096, on_gpu=True)
    assert args["speculative_config"] == {"method": "draft_model", "model": "d", "num_speculative_tokens": 3}
    assert args["tensor_parallel_size"] == 2 and "enforce_eager" not in args


def metric(name, value=None, values=None):
    return SimpleNamespace(name=name, value=value, values=values)


def test_spec_counters_are_read_and_differenced_over_a_window():
    before = spec_counters([metric("vllm:spec_decode_num_drafts", 3), metric("vllm:spec_decode_num_draft_tokens", 9),
                            metric("vllm:spec_decode_num_accepted_tokens", 5),
                            metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=[3, 2]),
                            metric("vllm:num_requests_running", 1)])
    after = spec_counters([metric("vllm:spec_decode_num_drafts", 10), metric("vllm:spec_decode_num_draft_tokens", 30),
                           metric("vllm:spec_decode_num_accepted_tokens", 17),
                           metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=[8, 6, 3])])
    assert counter_difference(before, after) == {"num_drafts": 7, "num_draft_tokens": 21, "num_accepted_tokens": 12,
                                                 "num_accepted_tokens_per_pos": [5, 4, 3]}
    # Without speculation vLLM has no spec-decode metrics at all: zeros, not an error.
    assert spec_counters([]) == {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                                 "num_accepted_tokens_per_pos": []}


def test_per_request_drafts_from_vllms_per_step_metrics():
    counts = per_request_drafts({"per_step_drafted": [3, 3, 0, 2], "per_step_accepted": [3, 1, 0, 2]}, gamma=3)
    assert counts == {"drafted_tokens": 8, "accepted_tokens": 6,
                      "drafted_per_position": [3, 3, 2], "accepted_per_position": [3, 2, 1]}
    assert per_request_drafts(None, gamma=2)["drafted_per_position"] == [0, 0]
    assert per_request_drafts(None, gamma=0) == {}


def test_cpu_environment_keeps_what_the_user_set(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_environment(2, tmp_path) == {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                            "OMP_NUM_THREADS": "2"}
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    assert cpu_environment(2, tmp_path)["LD_PRELOAD"] == str(tmp_path / "lib" / "libiomp5.so")


def test_the_shipped_engines_experiment_is_not_in_the_default_target():
    from specdec.gate.config import experiments_to_run

    config = load_config(REPO / "config.yaml")
    assert experiments_to_run(config) == ["default"]
    assert experiments_to_run(dict(config, run=["engines"])) == ["engines"]
    with pytest.raises(ConfigError, match="config key 'run': experiment 'nope' is not defined"):
        validate(dict(config, run=["nope"]))
    engines = [c for c in expand_matrix(config) if c.experiment == "engines"]
    assert {c.engine for c in engines} == {"specdec", "transformers", "vllm"}
    assert {(c.method, c.drafter.name if c.drafter else None) for c in engines} == {
        ("ar", None), ("speculative", "bf16"), ("speculative", "self"), ("ngram", "ngram"), ("eagle3", "eagle"),
        ("eagle3", "eagle_tree")}
