"""The engine's CPU linear kernels: the same numbers as F.linear, scoped to the engine."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.decoding import GenerationSettings, ModelDrafter, generate, kernels
from specdec.decoding.cache import RaggedCache


@pytest.fixture
def always_weight_major(monkeypatch):
    """Pretend every model was timed faster with W @ x.T, so the tuned path certainly runs."""
    monkeypatch.setattr(kernels, "probe", lambda model, rows=1: {"weight_major": True})


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("rows", [1, 2, 5, kernels.MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_major_linear_equals_f_linear(rows, bias):
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(1, rows, 24)
    assert torch.allclose(kernels._weight_major(layer, x), F.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_decode_kernels_tune_only_float32_cpu_linears_and_leave_the_model_unchanged(always_weight_major):
    model, bf16 = tiny_llama(), tiny_llama(torch.bfloat16)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    with kernels.decode_kernels(model, bf16, None) as tuned:
        assert tuned == len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
        assert all("forward" in m.__dict__ for m in linears)
        assert not any("forward" in m.__dict__ for m in bf16.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_target_drafting_for_itself_is_tuned_once(always_weight_major):
    """One model as target and drafter: its layers are patched once and restored once."""
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 9))
    settings = GenerationSettings(max_new_tokens=8, gamma=2)
    with kernels.decode_kernels(model, model) as tuned:
        assert tuned == 2 * 7 + 1
    rows = generate(model, ids, torch.ones_like(ids), settings, ModelDrafter(model))
    assert all(r.accepted_tokens == r.drafted_tokens > 0 for r in rows)  # itself: every draft kept
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_decode_kernels_are_removed_after_an_error(always_weight_major):
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="boom"), kernels.decode_kernels(model):
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_generation_is_the_same_under_the_tuned_kernels(always_weight_major, monkeypatch):
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    settings = GenerationSettings(max_new_tokens=12)
    tuned = generate(model, ids, mask, settings)
    kernels.choose(model, False)
    library = generate(model, ids, mask, settings)
    assert [r.output_ids for r in tuned] == [r.output_ids for r in library]


def test_a_choice_made_elsewhere_overrides_the_probe():
    model = tiny_llama()
    measured = kernels.probe(model, rows=4)
    assert measured["layers"] == 15 and measured["rows"] == 4 and measured["library_s"] > 0
    assert measured["weight_major"] == (measured["weight_major_s"] < 0.9 * measured["library_s"])
    for choice in (True, False):
        kernels.choose(model, choice)
        assert len(kernels.tuned_linears(model)) == (15 if choice else 0)
    assert kernels.probe(tiny_llama(torch.bfloat16)) == {"layers": 0, "rows": 1, "weight_major": False}


def test_ragged_cache_passes_the_cache_under_the_forwards_own_keyword():
    """transformers 5.23 renamed past_key_values to cache; either way the model must run cached."""
    model = tiny_llama()
    cache = RaggedCache(model, 1, torch.device("cpu"))
    assert cache.cache_kwarg in ("cache", "past_key_values")
    ids = torch.randint(3, 64, (1, 6))
    cache.extend(ids, torch.ones_like(ids, dtype=torch.bool))
    assert cache.cache.get_seq_length() == 6


@pytest.mark.parametrize("tied", [False, True])
def test_prepacked_bfloat16_linears_compute_the_same_logits(tied):
    import copy

    from specdec.prepare.models import weight_bytes

    plain = tiny_llama(torch.bfloat16)
    if tied:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    packed = copy.deepcopy(plain)
    assert kernels.prepack_bfloat16_linears(packed) == (2 * 7 + 1 if kernels.bf16_prepacking_supported() else 0)
    ids = torch.randint(3, 64, (2, 7))
    with torch.inference_mode():
        for keep in (0, 1):  # every position, and transformers' last-position slice
            assert torch.allclose(packed(input_ids=ids, logits_to_keep=keep).logits,
                                  plain(input_ids=ids, logits_to_keep=keep).logits, rtol=1e-2, atol=1e-2)
    head = plain.lm_head.weight.nbytes
    extra = head if tied and kernels.bf16_prepacking_supported() else 0  # a tied head gets a packed copy
    assert weight_bytes(packed) >= weight_bytes(plain) + extra  # packed weights are counted


def test_prepacking_leaves_float32_models_alone():
    model = tiny_llama()
    assert kernels.prepack_bfloat16_linears(model) == 0
    assert all(type(m) is not kernels.PrepackedLinear for m in model.modules())


def test_a_prepacked_bf16_drafter_keeps_speculative_decoding_lossless():
    from specdec.decoding import ModelDrafter
    from specdec.prepare.models import quantized_copy

    target = tiny_llama()
    drafter = quantized_copy(target, "bf16")
    assert any(type(m) is kernels.PrepackedLinear for m in drafter.modules()) == kernels.bf16_prepacking_supported()
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    settings = GenerationSettings(max_new_tokens=12, gamma=4)
    speculative = generate(target, ids, mask, settings, ModelDrafter(drafter))
    assert [r.output_ids for r in speculative] == [r.output_ids for r in generate(target, ids, mask, settings)]
    assert sum(r.accepted_tokens for r in speculative) > 0
