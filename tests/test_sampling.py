"""Lossless speculative sampling, checked statistically on tiny random models."""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.decoding import Draft, GenerationSettings, ModelDrafter, NgramDrafter, Sampler, generate, verify

from conftest import chi_square_p, exact_joint, static_caches

VOCAB = 16


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.3,  # peaked, distinct distributions: drafts get rejected often
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def drafter_model():
    return tiny_model(1)


PROMPT = [5, 9, 3, 7, 5, 9, 3]


def sampled_tokens(target, settings, drafter, draws: int, seed: int, length: int) -> torch.Tensor:
    ids = torch.tensor([PROMPT] * draws)
    rows = generate(target, ids, torch.ones_like(ids), settings, drafter, torch.Generator().manual_seed(seed))
    assert all(len(r.output_ids) == length for r in rows)
    return torch.tensor([r.output_ids for r in rows])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(
    "drafter_kind, warp",
    [("model", {}), ("model", {"top_k": 6, "top_p": 0.9}), ("ngram", {}), (None, {"temperature": 0.7})],
)
def test_speculative_sampling_keeps_the_target_distribution(target, drafter_model, drafter_kind, warp, cache):
    settings = GenerationSettings(max_new_tokens=3, gamma=3, **{"temperature": 1.0, **warp})
    drafter = {"model": ModelDrafter(drafter_model), "ngram": NgramDrafter(n=2, min_context=1), None: None}[drafter_kind]
    draws = 6000
    # The static cache's minimal length: prompt + max_new_tokens + gamma + 1.
    with static_caches(target, drafter_model, max_length=len(PROMPT) + 3 + 3 + 1) if cache == "static" else contextlib.nullcontext():
        tokens = sampled_tokens(target, settings, drafter, draws, seed=11, length=3)
    # Tokens 2 and 3 come from the first speculative step (token 1 is the target's, after prefill).
    joint = exact_joint(target, settings, PROMPT, 3).reshape(VOCAB, VOCAB, VOCAB)
    pair_counts = torch.bincount(tokens[:, 1] * VOCAB + tokens[:, 2], minlength=VOCAB**2)
    assert chi_square_p(pair_counts, joint.sum(0).reshape(-1)) > 1e-3
    first_counts = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB**2)
    assert chi_square_p(first_counts, joint.sum(2).reshape(-1)) > 1e-3


def test_the_test_detects_the_drafter_distribution(target, drafter_model):
    """Power check: sampling the drafter alone is rejected by the same test."""
    settings = GenerationSettings(max_new_tokens=3, temperature=1.0)
    tokens = sampled_tokens(drafter_model, settings, None, 6000, seed=11, length=3)
    joint = exact_joint(target, settings, PROMPT, 3).reshape(VOCAB, VOCAB, VOCAB)
    pair_counts = torch.bincount(tokens[:, 1] * VOCAB + tokens[:, 2], minlength=VOCAB**2)
    assert chi_square_p(pair_counts, joint.sum(0).reshape(-1)) < 1e-6


def test_seeded_sampling_is_reproducible(target, drafter_model):
    settings = GenerationSettings(max_new_tokens=12, temperature=0.8, gamma=3)
    first, second = (sampled_tokens(target, settings, ModelDrafter(drafter_model), 4, seed=5, length=12) for _ in range(2))
    assert torch.equal(first, second)


def test_verify_rejection_resamples_from_the_residual():
    """p = (0.5, 0.5, 0), q = point mass on token 0: token 0 is accepted half the time; after a
    rejection the next token is always 1 (the residual max(0, p - q) has all its mass there)."""
    sampler = Sampler(1.0, 0, 1.0, torch.Generator().manual_seed(0))
    n = 4000
    logits = torch.log(torch.tensor([0.5, 0.5, 1e-30])).expand(n, 2, 3)
    draft = Draft(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, dtype=torch.long))
    accepted, nxt, _ = verify(logits, draft, sampler)
    assert abs(accepted.float().mean().item() - 0.5) < 0.05
    assert torch.all(nxt[accepted == 0] == 1)


def test_verify_greedy_accepts_the_matching_prefix():
    sampler = Sampler(0.0, 0, 1.0, None)
    logits = torch.full((2, 4, 5), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 4]])
    logits.scatter_(2, best[..., None], 1.0)
    draft = Draft(torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.tensor([3, 3]))
    accepted, nxt, _ = verify(logits, draft, sampler)
    assert accepted.tolist() == [3, 1] and nxt.tolist() == [4, 0]
    short = Draft(torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.tensor([1, 0]))
    accepted, nxt, _ = verify(logits, short, sampler)
    assert accepted.tolist() == [1, 0] and nxt.tolist() == [2, 1]
