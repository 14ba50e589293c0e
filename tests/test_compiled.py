"""The compiled path (decoding.compiled) on the CPU: a tiny random Llama's greedy tokens
through torch.compile'd static-cache steps equal the growing cache's, and the record says so;
a compiled cell's attribution times its steps.
Compiling its shapes cold takes minutes on the 2-core CI machine (17 min under a load of
12-16), not seconds: inductor's CPU compile, not the model's size, sets the time."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.decoding import GenerationSettings, ModelDrafter, generate
from specdec.decoding.cache import static_setup, use_dynamic_cache
from specdec.decoding.compiled import compile_steps, step_widths
from specdec.prepare.models import quantized_copy


def test_compiled_steps_decode_the_same_tokens(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    target = LlamaForCausalLM(config).eval()
    # its int8 copy drafts (drafters.NAME.compile on a quantized drafter): some of its drafts
    # are rejected and rolled back
    draft_model = quantized_copy(target, "int8")
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    settings = GenerationSettings(max_new_tokens=10, gamma=2)
    growing = generate(target, ids, mask, settings, ModelDrafter(draft_model))
    try:
        records = [compile_steps(model, 32, 2, {role: step_widths(settings.gamma, role)}, tmp_path / "cache")
                   for model, role in ((target, "target"), (draft_model, "drafter"))]
        compiled = generate(target, ids, mask, settings, ModelDrafter(draft_model))
    finally:
        use_dynamic_cache(target)
        use_dynamic_cache(draft_model)
    assert [r.output_ids for r in compiled] == [r.output_ids for r in growing]
    assert [r.accepted_tokens for r in compiled] == [r.accepted_tokens for r in growing]
    assert all(r.drafted_tokens > 0 for r in compiled) and any(r.drafted_tokens > r.accepted_tokens for r in compiled)
    for record in records:
        assert record["enabled"] and record["static_cache"] and record["device"] == "cpu" and record["compile_s"] > 0
    assert any((tmp_path / "cache").iterdir())  # inductor's cache went to the shared folder
    assert static_setup(target) is None


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
