"""The compiled path (decoding.compiled) on the CPU: a tiny random Llama's greedy tokens
through torch.compile'd static-cache steps equal the growing cache's, and the record says so.
Compiling its shapes cold takes minutes on the 2-core CI machine (17 min under a load of
12-16), not seconds: inductor's CPU compile, not the model's size, sets the time."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.decoding import GenerationSettings, ModelDrafter, generate
from specdec.decoding.cache import static_setup, use_dynamic_cache
from specdec.decoding.compiled import compile_steps, step_widths
from specdec.models import quantized_copy


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
