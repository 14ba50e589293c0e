"""Drafter copies that never double the target in memory, and the memory report's sizes."""

import copy

import pytest
import torch

from specdec.decoding import kernels
from specdec.prepare.models import kv_cache_bytes, quantized_copy, weight_bytes


@pytest.fixture(scope="module")
def target(embedded_model):
    return embedded_model[0]


def test_int8_copy_shares_the_unquantised_tensors(target):
    int8 = quantized_copy(target, "int8")
    assert int8.model.embed_tokens.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    assert int8.model.norm.weight.data_ptr() == target.model.norm.weight.data_ptr()
    assert type(target.model.layers[0].mlp.up_proj) is torch.nn.Linear  # the target keeps its layers
    linear_params = sum(m.weight.numel() for m in target.modules() if type(m) is torch.nn.Linear)
    # together: the target once, plus one byte per quantised weight (and per-layer scales and biases)
    extra = weight_bytes(target, int8) - weight_bytes(target)
    assert linear_params <= extra < linear_params * 1.01


def test_int8_copy_refuses_a_model_that_is_not_float32(target):
    with pytest.raises(ValueError, match="starts from a float32 model, got torch.bfloat16"):
        quantized_copy(quantized_copy(target, "bf16"), "int8")


def test_bf16_copy_is_a_bf16_twin_its_linears_prepacked_on_this_cpu(target):
    bf16 = quantized_copy(target, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    packed = isinstance(bf16.lm_head, kernels.PrepackedLinear)
    assert packed == kernels.bf16_prepacking_supported()
    # Prepacked, the tied lm_head holds a packed copy of its own; plain, it stays tied.
    assert packed or bf16.lm_head.weight is bf16.model.embed_tokens.weight
    head = bf16.model.embed_tokens.weight.nbytes if packed else 0
    assert weight_bytes(bf16) == pytest.approx(weight_bytes(target) / 2 + head, rel=0.001)
    ids = torch.randint(3, 1000, (1, 12))
    with torch.inference_mode():  # the same numbers as converting a whole copy
        assert torch.equal(bf16(ids).logits, copy.deepcopy(target).to(torch.bfloat16)(ids).logits)


def test_kv_cache_bytes_from_the_config(target):
    c = target.config  # 30 layers x 3 KV heads x 64 dims, fp32
    assert kv_cache_bytes(target, batch=2, tokens=100) == 2 * 30 * 3 * 64 * 100 * 2 * 4
    assert c.num_key_value_heads == 3 and c.head_dim == 64
