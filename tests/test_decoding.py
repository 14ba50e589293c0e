"""Greedy decoding on the embedded model: AR equals transformers, speculative equals AR,
batched rows equal the rows decoded alone, on the growing and on the static cache; counts add
up; bad input is refused."""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.decoding import (
    GenerationSettings, ModelDrafter, NgramDrafter, RecyclingDrafter, SuffixDrafter, VocabularyMismatch,
    check_same_vocabulary, generate,
)
from specdec.decoding.cache import RaggedCache, open_cache, use_dynamic_cache, use_static_cache
from specdec.decoding.trees import TreeShape
from specdec.prepare.models import quantized_copy

from conftest import greedy_settings, static_caches

PROMPTS = [
    ("code", 'from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
             '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
             '    given threshold.\n    """\n'),
    ("chat", "Write a Python function that returns the squares of a list of numbers."),
    ("chat", "What is the capital of France? One word."),  # ends with EOS well before the limit
    ("chat", "Say hello."),  # ends with EOS too, at another step
]
NEW_TOKENS = 40
TREE = TreeShape.from_branching([2, 2, 1, 1])  # 14 nodes at gamma 4


@pytest.fixture(scope="module")
def encoded(embedded_model):
    _, tokenizer = embedded_model
    texts = [
        text if kind == "code" else tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for kind, text in PROMPTS
    ]
    return [tokenizer(texts, return_tensors="pt", padding=True)] + [tokenizer([t], return_tensors="pt") for t in texts]


@pytest.fixture(scope="module")
def settings(embedded_model):
    _, tokenizer = embedded_model
    return greedy_settings(tokenizer, NEW_TOKENS)


@pytest.fixture(scope="module")
def alone(embedded_model, encoded, settings):
    """Greedy AR output of each prompt decoded on its own."""
    model, _ = embedded_model
    return [generate(model, e.input_ids, e.attention_mask, settings)[0] for e in encoded[1:]]


def test_ar_equals_transformers_generate(embedded_model, encoded, alone, settings):
    model, tokenizer = embedded_model
    for e, row in zip(encoded[1:], alone):
        with torch.inference_mode():
            out = model.generate(**e, max_new_tokens=NEW_TOKENS, do_sample=False, top_k=None, top_p=None,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert row.output_ids == out[0, e.input_ids.shape[1]:].tolist()
    assert [r.finish_reason for r in alone] == ["length", "length", "eos", "eos"]
    for row in alone:  # one target forward per token, the first right after prefill
        assert row.target_forwards == len(row.output_ids) == len(row.emissions)
        assert row.drafted_tokens == row.accepted_tokens == 0 and row.drafted_per_position == []


def static_length(encoded, settings, nodes: int | None = None) -> int:
    """The static cache's minimal length for the batch: prompt + max_new_tokens + draft nodes
    (gamma for a chain) + 1 (ragged rows then need compaction)."""
    return encoded.input_ids.shape[1] + settings.max_new_tokens + (nodes or settings.gamma) + 1


@pytest.mark.parametrize("kind, cache", [("int8", "dynamic"), ("bf16", "dynamic"), ("ngram", "dynamic"), (None, "dynamic"),
                                         ("suffix", "dynamic"), ("recycling", "dynamic"), ("bf16 tree", "dynamic"),
                                         ("bf16", "static"), ("self", "static"), ("ngram", "static"), (None, "static"),
                                         ("ngram tree", "static")])
def test_batched_greedy_rows_equal_each_row_alone(embedded_model, encoded, alone, settings, kind, cache):
    """`alone` ran on the growing cache: the static one gives the same tokens, also with the
    target drafting for itself (one model, two static caches), and token trees (trees.py)
    give the same tokens as chains."""
    model, _ = embedded_model
    if kind in ("int8", "bf16"):
        drafter = ModelDrafter(quantized_copy(model, kind))
    else:
        drafter = {"self": ModelDrafter(model), "ngram": NgramDrafter(n=3), "suffix": SuffixDrafter(),
                   "recycling": RecyclingDrafter(), "bf16 tree": ModelDrafter(quantized_copy(model, "bf16"), TREE),
                   "ngram tree": NgramDrafter(n=3, tree=TREE), None: None}[kind]
    batch = encoded[0]
    models = [model] + ([drafter.model] if kind in ("bf16", "self", "bf16 tree") else [])
    nodes = drafter.max_nodes(settings.gamma) if drafter is not None else None
    with static_caches(*models, max_length=static_length(batch, settings, nodes)) if cache == "static" else contextlib.nullcontext():
        rows = generate(model, batch.input_ids, batch.attention_mask, settings, drafter)
    for row, ref in zip(rows, alone):
        assert row.output_ids == ref.output_ids
        assert row.finish_reason == ref.finish_reason
        assert sum(n for _, n in row.emissions) == len(row.output_ids)
        assert row.emissions[0][1] == 1  # the target's first token, alone
        assert [t for t, _ in row.emissions] == sorted(t for t, _ in row.emissions)
        assert row.target_forwards == len(row.emissions)
        # per depth: a chain's every node, a tree's deepest (a tree has more nodes than depths)
        depths = sum(row.drafted_per_position)
        assert depths == row.drafted_tokens or ("tree" in str(kind) and depths <= row.drafted_tokens)
        assert sum(row.accepted_per_position) == row.accepted_tokens <= depths
        # position i + 1 is only accepted after position i was
        assert row.accepted_per_position == sorted(row.accepted_per_position, reverse=True)
    if kind in ("int8", "bf16", "self", "bf16 tree"):
        assert all(r.drafted_per_position[0] == r.target_forwards - 1 for r in rows)
        assert all(r.accepted_tokens > 0 for r in rows)
        assert sum(r.target_forwards for r in rows) < sum(len(r.output_ids) for r in rows)


def test_ragged_rollback_matches_a_fresh_prefill():
    """Rows keep different numbers of the tokens just fed; the next logits of each row equal
    those of the kept sequence run from scratch (transformers 5 `crop(-k)` semantics)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    fed = torch.tensor([[11, 12, 13, 14], [15, 16, 17, 18]])
    with torch.no_grad():
        cache, _ = RaggedCache.prefill(model, prompt, mask)
        cache.extend(fed, torch.ones_like(fed, dtype=torch.bool))
        cache.rollback(torch.tensor([1, 3]), window=4, max_keep=3)
        assert cache.cache.get_seq_length() == 4 + 3 and cache.lengths.tolist() == [3, 7]
        logits = cache.extend(torch.tensor([[20], [21]]), torch.ones(2, 1, dtype=torch.bool))[:, -1]
        for row, kept in enumerate([[5, 6, 11, 20], [7, 8, 9, 10, 15, 16, 17, 21]]):
            fresh = model(torch.tensor([kept])).logits[0, -1]
            torch.testing.assert_close(logits[row], fresh, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bf16", "ngram", None])
def test_static_cache_rows_alone_equal_the_growing_cache(embedded_model, encoded, alone, settings, kind):
    """Batch 1 on the static cache: each row's tokens and forwards equal the growing cache's."""
    model, _ = embedded_model
    draft_model = quantized_copy(model, "bf16") if kind == "bf16" else None
    drafter = ModelDrafter(draft_model) if kind == "bf16" else NgramDrafter(n=3) if kind == "ngram" else None
    for e, ref in zip(encoded[1:], alone):
        with static_caches(*[m for m in (model, draft_model) if m is not None], max_length=static_length(e, settings)):
            row = generate(model, e.input_ids, e.attention_mask, settings, drafter)[0]
        assert (row.output_ids, row.finish_reason) == (ref.output_ids, ref.finish_reason)
        if kind is None:
            assert row.target_forwards == ref.target_forwards


def tiny_random_llama(layers: int = 2, hidden: int = 32, vocab: int = 64):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("max_length", [64, 12])
def test_static_rollback_and_compaction_match_a_fresh_prefill(max_length):
    """The static cache's rollback moves its pointer back. Rows keep different counts, leaving
    masked slots; at 12 slots the third step does not fit, so each row's kept slots move to
    the front: logits still equal those of each row's kept tokens run from scratch, also
    after a row leaves the batch."""
    model = tiny_random_llama()
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    use_static_cache(model, max_length)
    try:
        with torch.no_grad():
            cache, _ = open_cache(model, prompt, mask, "target")
            for fed, keep in ([[11, 12, 13, 14], [15, 16, 17, 18]], [1, 3]), ([[30, 31], [32, 33]], [2, 1]):
                fed = torch.tensor(fed)
                cache.extend(fed, torch.ones_like(fed, dtype=torch.bool))
                cache.rollback(torch.tensor(keep), window=fed.shape[1], max_keep=max(keep))
            assert cache.used == 4 + 3 + 2 and cache.lengths.tolist() == [5, 8]
            assert int(cache.cache.layers[0].cumulative_length) == cache.used
            step = torch.tensor([[20, 22, 24, 26], [21, 23, 25, 27]])
            logits = cache.extend(step, torch.ones_like(step, dtype=torch.bool))
            assert cache.used == (13 if max_length == 64 else 12)  # compacted: 8 slots, then 4
            assert cache.mask[:, : cache.used].sum(1).tolist() == [9, 12]
            kept = [[5, 6, 11, 30, 31, 20, 22, 24, 26], [7, 8, 9, 10, 15, 16, 17, 32, 21, 23, 25, 27]]
            for row, tokens in enumerate(kept):
                fresh = model(torch.tensor([tokens])).logits[0, -4:]
                torch.testing.assert_close(logits[row], fresh, atol=1e-5, rtol=1e-4)
            cache.select(torch.tensor([0]))  # row 1 leaves: row 0 moves to the batch-1 cache
            last = cache.extend(torch.tensor([[28]]), torch.ones(1, 1, dtype=torch.bool))[:, -1]
            fresh = model(torch.tensor([kept[0] + [28]])).logits[0, -1]
            torch.testing.assert_close(last[0], fresh, atol=1e-5, rtol=1e-4)
    finally:
        use_dynamic_cache(model)


def test_a_static_cache_too_short_is_refused_by_name():
    model = tiny_random_llama()
    ids = torch.tensor([[5, 6, 7]])
    use_static_cache(model, 8)
    try:
        with pytest.raises(ValueError, match="static cache holds 8 slots; this batch needs 13"):
            generate(model, ids, torch.ones_like(ids), GenerationSettings(max_new_tokens=6, gamma=3), NgramDrafter())
    finally:
        use_dynamic_cache(model)


@pytest.mark.parametrize(
    "field, value", [("gamma", -1), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_new_tokens", 0)]
)
def test_bad_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationSettings(**{"max_new_tokens": 8, field: value})


def test_a_drafter_needs_draft_tokens(embedded_model):
    """gamma 0 means AR (no drafter); with a drafter it is refused, not silently AR."""
    model, _ = embedded_model
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="gamma >= 1"):
        generate(model, ids, torch.ones_like(ids), GenerationSettings(max_new_tokens=2, gamma=0), drafter=NgramDrafter())


def test_empty_prompt_is_refused(embedded_model, settings):
    model, _ = embedded_model
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.tensor([[2, 2], [5, 6]]), torch.tensor([[0, 0], [1, 1]]), settings)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), settings)


def test_mismatched_vocabulary_is_refused(embedded_model):
    model, tokenizer = embedded_model
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(VocabularyMismatch, match="vocab_size 1000"):
        check_same_vocabulary(model, other)
    check_same_vocabulary(model, model, tokenizer, tokenizer)


def test_ngram_drafter_follows_the_longest_context_and_backs_off():
    drafter = NgramDrafter(n=3, top_k=2, min_context=1)
    session = drafter.start(torch.tensor([[1, 2, 3, 1, 2, 4, 9]]), torch.ones(1, 7, dtype=torch.long), None, 10)
    # context (9,) unseen; nothing to propose
    assert session.propose(torch.tensor([9]), 4).lengths.tolist() == [0]
    from specdec.decoding import StepOutcome
    session.commit(StepOutcome(torch.tensor([0]), [0], torch.tensor([1]), [[1]]))
    # (9, 1) unseen -> back off to (1,): seen followed by 2 twice; then (1, 2) -> 4 (most recent), (2, 4) -> 9
    assert session.propose(torch.tensor([1]), 4).tokens.tolist() == [[2, 4, 9, 1]]


def test_ngram_drafter_needs_min_context_tokens_of_match():
    from specdec.decoding import StepOutcome

    session = NgramDrafter(n=4, min_context=2).start(torch.tensor([[5, 1, 2, 3, 7, 1]]), torch.ones(1, 6, dtype=torch.long), None, 10)
    # only (1,) matches: a one-token match is not enough
    assert session.propose(torch.tensor([1]), 4).lengths.tolist() == [0]
    session.commit(StepOutcome(torch.tensor([0]), [0], torch.tensor([2]), [[2]]))
    # (1, 2) matches: continue 3, then (1, 2, 3) -> 7, (2, 3, 7) -> 1, (3, 7, 1) -> 2
    assert session.propose(torch.tensor([2]), 4).tokens.tolist() == [[3, 7, 1, 2]]


@pytest.mark.parametrize("kwargs", [{"n": 1}, {"top_k": 0}, {"n": 3, "min_context": 3}, {"min_context": 0}])
def test_ngram_drafter_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="NgramDrafter"):
        NgramDrafter(**kwargs)
