"""The compiled path (decoding.compiled) on the CPU: a tiny random Llama's greedy tokens
through torch.compile'd static-cache steps equal the growing cache's, for chains and token
trees (static and dynamic, ragged rows), with nothing compiled inside decoding, and the
record says so; every step shape a tree drafter runs is one its warm-up compiles; a compiled
cell's attribution times its steps.
Compiling its shapes cold takes minutes on the 2-core CI machine (17 min under a load of
12-16), not seconds: inductor's CPU compile, not the model's size, sets the time."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.decoding import GenerationSettings, ModelDrafter, NgramDrafter, generate
from specdec.decoding.cache import logits_and_hidden, static_setup, use_dynamic_cache, use_static_cache
from specdec.decoding.compiled import compile_steps
from specdec.decoding.trees import DynamicTree, TreeShape
from specdec.prepare.models import quantized_copy

# Cut at depth 1, 2, 3: 2, 5, 6 nodes; the draft model feeds levels of 2 nodes, then 1
TREE = TreeShape.of([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
DYNAMIC = DynamicTree(top_k=2, depth=3, nodes=5)
NOISE = 0.3  # of each weight's spread, added to the drafter's copy of the target


def _target_and_drafter():
    """A tiny random Llama and the int8 copy (drafters.NAME.compile on a quantized drafter) of
    it with noise added, whose drafts the target often rejects: rows accept different paths.
    Batch 2, the second row padded."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    target = LlamaForCausalLM(config).eval()
    noisy = copy.deepcopy(target)
    with torch.no_grad():
        for weight in noisy.parameters():
            weight.add_(torch.randn_like(weight) * weight.std() * NOISE)
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return target, quantized_copy(noisy, "int8"), ids, mask


def _widths(drafters, gamma: int, role: str) -> tuple[list[int], list[int]]:
    """The union of the drafters' (causal, tree) step widths for `role`, as one compile serves them all."""
    both = [d.verify_widths(gamma) if role == "target" else d.draft_widths(gamma) for d in drafters]
    return sorted({w for causal, _ in both for w in causal}), sorted({w for _, tree in both for w in tree})


def test_compiled_steps_decode_the_same_tokens(tmp_path):
    """Compiled as the engine does (`SpecdecEngine.prepare`): the drafter's steps, then the
    target's; no graph is compiled while decoding a static tree, a dynamic tree or a chain."""
    target, draft_model, ids, mask = _target_and_drafter()
    settings = GenerationSettings(max_new_tokens=10, gamma=2)
    drafters = {"static tree": ModelDrafter(draft_model, TREE), "dynamic tree": ModelDrafter(draft_model, DYNAMIC),
                "chain": ModelDrafter(draft_model)}
    growing = {name: generate(target, ids, mask, settings, drafter) for name, drafter in drafters.items()}
    compiled = {}
    try:
        records = []
        for model, role in ((draft_model, "drafter"), (target, "target")):
            causal, tree = _widths(drafters.values(), settings.gamma, role)
            records.append(compile_steps(model, 32, 2, {role: causal}, tmp_path / "cache", tree_widths={role: tree}))
        for name, drafter in drafters.items():
            graphs = counters["stats"]["unique_graphs"]
            compiled[name] = generate(target, ids, mask, settings, drafter)
            assert counters["stats"]["unique_graphs"] == graphs, f"{name}: a step was compiled inside decoding"
    finally:
        use_dynamic_cache(target)
        use_dynamic_cache(draft_model)
    for name, rows in compiled.items():
        assert [r.output_ids for r in rows] == [r.output_ids for r in growing[name]], name
        assert [r.accepted_tokens for r in rows] == [r.accepted_tokens for r in growing[name]], name
        assert all(r.drafted_tokens > 0 for r in rows) and any(r.drafted_tokens > r.accepted_tokens for r in rows)
    for rows in compiled["static tree"], compiled["dynamic tree"]:
        assert all(r.drafted_tokens > 2 * (r.target_forwards - 1) for r in rows)  # more nodes a step than a chain of 2
        assert [n for _, n in rows[0].emissions] != [n for _, n in rows[1].emissions]  # ragged rows
    for record in records:
        assert record["enabled"] and record["static_cache"] and record["device"] == "cpu" and record["compile_s"] > 0
    assert any((tmp_path / "cache").iterdir())  # inductor's cache went to the shared folder
    assert static_setup(target) is None


@pytest.mark.parametrize("tree", [TREE, DYNAMIC, "ngram"])
def test_a_tree_drafters_steps_are_the_shapes_its_warm_up_compiles(tree):
    """Every step forward of a tree cell, the target's and the draft model's, has a width and
    mask (causal, or the tree's 4D one) that `Drafter.verify_widths` / `draft_widths` name,
    so the warm-up compiles it (on CUDA a graph per shape): recorded on eager static caches,
    ragged rows leaving the batch, drafts cut near the length limit; the tokens are AR's."""
    target, draft_model, ids, mask = _target_and_drafter()
    ids[:, 3:] = ids[:, :3]  # a repeat for the n-gram table to match
    drafter = NgramDrafter(n=2, min_context=1, tree=TREE) if tree == "ngram" else ModelDrafter(draft_model, tree)
    settings = GenerationSettings(max_new_tokens=9, gamma=3)
    ar = generate(target, ids, mask, settings)
    steps = {target: set(), draft_model: set()}
    for model, seen in steps.items():
        use_static_cache(model, 64, lambda seen=seen, model=model, **kwargs: _recorded(seen, model, kwargs))
    try:
        rows = generate(target, ids, mask, settings, drafter)
    finally:
        use_dynamic_cache(target)
        use_dynamic_cache(draft_model)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    assert [n for _, n in rows[0].emissions] != [n for _, n in rows[1].emissions]  # ragged rows
    for model, (causal, trees) in ((target, drafter.verify_widths(settings.gamma)), (draft_model, drafter.draft_widths(settings.gamma))):
        assert steps[model] <= {(w, False) for w in causal} | {(w, True) for w in trees}
    assert any(is_tree for _, is_tree in steps[target])


def _recorded(seen: set, model, kwargs: dict):
    """An eager static step that records its (width, whether under a tree's 4D mask)."""
    seen.add((kwargs["input_ids"].shape[1], kwargs["attention_mask"].ndim == 4))
    return logits_and_hidden(model(**kwargs), kwargs)


def test_a_compiled_cell_has_its_forwards_costs_and_prediction(tmp_path, embedded_model_dir):
    """Compiled steps bypass the forward hooks: attribution times them around the compiled
    call, so a compiled cell's decode forwards are counted and theory reads its costs. A tiny
    random Llama (one layer), one prompt, γ 2: each compiled shape costs seconds, not minutes."""

    from conftest import cell_inputs, tiny_llama

    from specdec.job import runner
    from specdec.records import read_result
    from specdec.report import theory
    from specdec.gate.config import expand_matrix, validate

    tiny_llama(tmp_path / "tiny", 49152, tokenizer_of=embedded_model_dir)
    config = validate({
        "models": {"smollm2": {"source": "local", "path": str(tmp_path / "tiny"), "compile": True}},
        "drafters": {"int8": {"kind": "quantized", "dtype": "int8", "compile": True}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 1, "turns": "first"}},
        "experiments": {"tiny": {"target": "smollm2", "datasets": ["sample"], "max_new_tokens": 8, "warmup": 1,
                                 "methods": [{"method": "ar"}, {"method": "speculative", "drafter": "int8", "gamma": 2}]}},
        "power": {"idle_s": 0},
    })
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=3)
    results = {}
    for cell in expand_matrix(config):
        assert cell.target.compile
        results[cell.method] = runner.run_cell(cell, prompts, tmp_path / cell.method, models_dir=models_dir)
        assert results[cell.method]["status"] == "ok", results[cell.method]["failure"]
    ar, spec = results["ar"], results["speculative"]
    assert all(spec["engine"]["settings"]["compile"][role]["enabled"] for role in ("target", "drafter"))
    for result in (ar, spec):
        block = result["attribution"]
        assert block["available"] and block["steps"] > 0
        assert block["parts_s"]["verify"] > 0 and block["forwards"]["target_prefill"]["count"] == 1
    assert set(ar["attribution"]["forwards"]["target_decode"]) == {"1"}
    assert spec["attribution"]["forwards"]["drafter"]["1"]["count"] > 0 and spec["attribution"]["parts_s"]["drafter"] > 0
    columns = theory.run_theory(*(read_result(tmp_path / method / "result.json") for method in ("speculative", "ar")))
    assert columns["theory_cost_ratio"] > 0 and columns["theory_verify_cost_ratio"] > 0
    assert columns["predicted_speedup"] > 0 and columns["waterfall_overhead"] > 0
