"""The replay drafter on the embedded model: lossless for any error rate, every draft
accepted at error rate 0 and none at 1, acceptance 1 - p per position within binomial
bounds, reproducible from its seed, and paced to its cost per draft token."""

import math
import time

import pytest
import torch

from specdec.decoding import GenerationSettings, ModelDrafter, ReplayDrafter, generate
from specdec.job.leviathan import per_token_alpha
from specdec.prepare.models import quantized_copy

from conftest import greedy_settings

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a Python function that returns the squares of a list of numbers.",
    "What is the capital of France? One word.",  # ends with EOS well before the limit
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def batch(embedded_model):
    _, tokenizer = embedded_model
    texts = [PROMPTS[0]] + [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in PROMPTS[1:]
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def settings(embedded_model):
    _, tokenizer = embedded_model
    return greedy_settings(tokenizer, NEW_TOKENS)


@pytest.fixture(scope="module")
def reference(embedded_model, batch, settings):
    """(AR rows, prompt ids -> AR output ids) of the batch."""
    model, _ = embedded_model
    rows = generate(model, batch.input_ids, batch.attention_mask, settings)
    prompts = [tuple(t for t, m in zip(ids, mask) if m) for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist())]
    return rows, {p: r.output_ids for p, r in zip(prompts, rows)}


def replay(embedded_model, batch, settings, reference, error_rate, **kwargs):
    model, _ = embedded_model
    drafter = ReplayDrafter(reference[1], error_rate, seed=7, **kwargs)
    return generate(model, batch.input_ids, batch.attention_mask, settings, drafter)


def per_position(rows):
    drafted = [sum(r.drafted_per_position[i] for r in rows) for i in range(4)]
    accepted = [sum(r.accepted_per_position[i] for r in rows) for i in range(4)]
    return [{"drafted": d, "accepted": a} for d, a in zip(drafted, accepted)]


def test_error_rate_zero_accepts_every_draft_and_equals_ar(embedded_model, batch, settings, reference):
    ar, _ = reference
    rows = replay(embedded_model, batch, settings, reference, 0.0)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    assert all(r.drafted_tokens == r.accepted_tokens > 0 for r in rows)
    # every step keeps its whole draft and the target's next token
    assert sum(r.target_forwards for r in rows) < sum(r.target_forwards for r in ar) / 3


def test_error_rate_one_accepts_nothing_and_equals_ar(embedded_model, batch, settings, reference):
    ar, _ = reference
    rows = replay(embedded_model, batch, settings, reference, 1.0)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    assert sum(r.drafted_tokens for r in rows) > 0 and sum(r.accepted_tokens for r in rows) == 0


@pytest.mark.parametrize("error_rate", [0.2, 0.5])
def test_acceptance_is_one_minus_error_rate_per_position_and_outputs_equal_ar(embedded_model, batch, settings, reference, error_rate):
    ar, _ = reference
    rows = replay(embedded_model, batch, settings, reference, error_rate)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    positions = per_position(rows)
    alpha = 1 - error_rate
    # Position i is tried when positions 1 .. i-1 were kept (leviathan.per_token_alpha): a
    # binomial of those trials, checked within 4 standard deviations at each position.
    trials = [positions[0]["drafted"], *(min(p["accepted"], q["drafted"]) for p, q in zip(positions, positions[1:]))]
    for position, n in zip(positions, trials):
        if n:
            assert abs(position["accepted"] / n - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / n) + 1e-9
    pooled = per_token_alpha(positions)
    assert abs(pooled - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / sum(trials))


def test_same_seed_same_drafts_other_seed_other_drafts(embedded_model, batch, settings, reference):
    model, _ = embedded_model

    def counts(seed):
        rows = generate(model, batch.input_ids, batch.attention_mask, settings, ReplayDrafter(reference[1], 0.5, seed=seed))
        return [(r.accepted_per_position, r.target_forwards) for r in rows]

    assert counts(1) == counts(1)
    assert counts(1) != counts(2)


def test_pacing_costs_the_configured_time_per_draft_token(embedded_model, batch, settings, reference):
    model, _ = embedded_model
    session = ReplayDrafter(reference[1], 0.0, cost_s_per_token=0.01).start(
        batch.input_ids, batch.attention_mask, settings.sampler(None), model.config.vocab_size)
    began = time.perf_counter()
    draft = session.propose(torch.zeros(3, dtype=torch.long), 4)
    assert time.perf_counter() - began >= 0.04  # at least; a loaded machine only adds
    assert draft.tokens.shape == (3, 4)


def test_draft_model_forwards_run_and_their_tokens_are_discarded(embedded_model, batch, settings, reference):
    """With a draft model the replay pays its forwards, and still proposes the reference."""
    model, _ = embedded_model
    ar, continuations = reference
    drafter_model = quantized_copy(model, "int8")
    calls = []
    hook = drafter_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        rows = generate(model, batch.input_ids, batch.attention_mask, settings,
                        ReplayDrafter(continuations, 0.0, model=drafter_model))
        own = generate(model, batch.input_ids, batch.attention_mask, settings, ModelDrafter(drafter_model))
    finally:
        hook.remove()
    assert [r.output_ids for r in rows] == [r.output_ids for r in ar]
    assert all(r.drafted_tokens == r.accepted_tokens for r in rows)  # the reference, not the int8 copy's guesses
    assert sum(r.accepted_tokens for r in own) < sum(r.drafted_tokens for r in own)
    assert calls


def test_refuses_sampling_and_a_prompt_without_reference(embedded_model, batch, settings, reference):
    model, _ = embedded_model
    sampled = GenerationSettings(max_new_tokens=4, temperature=1.0, gamma=2)
    with pytest.raises(ValueError, match="greedy only"):
        generate(model, batch.input_ids, batch.attention_mask, sampled, ReplayDrafter(reference[1], 0.1))
    with pytest.raises(ValueError, match="no reference continuation for a prompt of"):
        generate(model, batch.input_ids, batch.attention_mask, settings, ReplayDrafter({}, 0.1))
    with pytest.raises(ValueError, match="error_rate must be in"):
        ReplayDrafter({}, 1.5)


CELL_CONFIG = {
    "seed": 5,
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {"replay80": {"kind": "replay", "error_rate": 0.2, "cost_ms_per_token": 1}},
    "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
    "experiments": {
        "rep": {
            "target": "smollm2", "datasets": ["sample"],
            "methods": [{"method": "ar"}, {"method": "speculative", "drafter": "replay80", "gamma": 3}],
            "max_new_tokens": 12, "warmup": 1, "attribution": False,
        }
    },
    "power": {"enabled": False},
}


def test_a_replay_cell_replays_its_ar_cell_through_the_runner(tmp_path, embedded_model_dir):
    """The cell reads the AR cell's requests.jsonl (records.read_reference_outputs), is
    lossless against it, and refuses a missing reference or one lacking a request."""
    from conftest import cell_inputs

    from specdec.job import runner
    from specdec.gate.config import expand_matrix, validate
    from specdec.records import read_reference_outputs, read_requests, write_requests
    from specdec.engines.specdec import SpecdecEngine

    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, CELL_CONFIG["datasets"]["sample"], seed=5)
    ar, replay_cell = expand_matrix(validate(CELL_CONFIG))
    runner.run_cell(ar, prompts, tmp_path / "ar", models_dir=models_dir)
    reference = tmp_path / "ar" / "requests.jsonl"
    result = runner.run_cell(replay_cell, prompts, tmp_path / "replay", models_dir=models_dir, reference=reference)
    assert result["status"] == "ok" and result["correctness"]["identical"]
    assert result["acceptance"]["drafted_tokens"] > 0 and result["theory"]["alpha"] > 0
    with pytest.raises(ValueError, match="needs the requests.jsonl of the AR cell"):
        runner.run_cell(replay_cell, prompts, tmp_path / "none", models_dir=models_dir)
    assert not (tmp_path / "none" / "result.json").exists()
    # a reference without one of the requests: the request that finds no continuation says so
    partial = tmp_path / "partial.jsonl"
    write_requests(partial, [r for r in read_requests(reference) if not r["request_id"].startswith("warmup:")])
    session = SpecdecEngine(replay_cell, None, None, ReplayDrafter({}, 0.2), None, None, None,
                      replayed=read_reference_outputs(partial), reference=partial)
    with pytest.raises(ValueError, match=f"the reference {partial} has no request 'warmup:"):
        session.register_prompt("warmup:" + next(iter(session.replayed)), [1, 2, 3])
