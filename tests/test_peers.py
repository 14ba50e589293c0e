"""transformers' generate() as reference rows: same outputs as ours under greedy decoding,
counts derived from streamer chunks, batch > 1 refused for the speculative peers."""

import pytest
import torch
from conftest import cell_inputs

from specdec.decoding import GenerationSettings, generate
from specdec.models import quantized_copy
from specdec.peers import NotSupported, hf_generate

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def setup(embedded_model):
    model, tokenizer = embedded_model
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ["Write a Python function that adds two numbers.", "What is the capital of France? One word."]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, eos_token_ids=(tokenizer.eos_token_id,),
                                  pad_token_id=tokenizer.pad_token_id, gamma=4)
    ours = generate(model, batch.input_ids, batch.attention_mask, settings)
    return model, batch, settings, ours


def test_plain_generate_rows_match_ours_and_stop_at_eos(setup):
    model, batch, settings, ours = setup
    rows = hf_generate(model, batch.input_ids, batch.attention_mask, settings)
    assert [r.output_ids for r in rows] == [r.output_ids for r in ours]
    assert [r.finish_reason for r in rows] == ["length", "eos"]
    for row in rows:
        assert row.target_forwards == len(row.output_ids) == len(row.emissions)
        assert all(n == 1 for _, n in row.emissions) and row.drafted_per_position == []


@pytest.mark.parametrize("peer", ["assisted", "prompt_lookup"])
def test_speculative_peers_match_ours_with_counts_from_chunks(setup, peer):
    model, batch, settings, ours = setup
    kwargs = ({"assistant_model": quantized_copy(model, "int8")} if peer == "assisted"
              else {"prompt_lookup_num_tokens": settings.gamma})
    assistant_config = kwargs.get("assistant_model") and kwargs["assistant_model"].generation_config
    row = hf_generate(model, batch.input_ids[:1], batch.attention_mask[:1], settings, **kwargs)[0]
    assert row.output_ids == ours[0].output_ids
    assert len(row.output_ids) == row.target_forwards + row.accepted_tokens
    assert sum(n for _, n in row.emissions) == len(row.output_ids) and len(row.emissions) == row.target_forwards
    assert sum(row.drafted_per_position) == row.drafted_tokens >= row.accepted_tokens
    assert sum(row.accepted_per_position) == row.accepted_tokens
    if peer == "assisted":
        # A fixed gamma every step but the last two, which the length limit caps (transformers
        # 5.24 drafts nothing when one token is left; earlier 5.x drafted at least one).
        capped = [row.target_forwards - drafted for drafted in row.drafted_per_position]
        assert capped == sorted(capped) and capped[-1] <= 2, row.drafted_per_position
        assert row.accepted_tokens > 0
        assert kwargs["assistant_model"].generation_config is assistant_config  # restored


@pytest.mark.parametrize("peer", ["assisted", "prompt_lookup"])
def test_speculative_peers_refuse_batches(setup, peer):
    model, batch, settings, _ = setup
    kwargs = {"assistant_model": model} if peer == "assisted" else {"prompt_lookup_num_tokens": 4}
    with pytest.raises(NotSupported, match="batch size 1"):
        hf_generate(model, batch.input_ids, batch.attention_mask, settings, **kwargs)


def test_sampling_settings_reach_generate(setup):
    """Sampling settings are passed explicitly (top_k 0 included, which transformers must
    read as "off", not fall back to its default of 50): with top_p near 0 only the argmax
    survives, so sampling reproduces the greedy output."""
    model, batch, _, ours = setup
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1e-6,
                                  eos_token_ids=(2,), pad_token_id=2)
    torch.manual_seed(0)
    row = hf_generate(model, batch.input_ids[:1], batch.attention_mask[:1], settings)[0]
    assert row.output_ids == ours[0].output_ids[:8]


@pytest.mark.parametrize("method, drafter", [("hf_assisted", "int8"), ("hf_prompt_lookup", None)])
def test_peer_cells_run_through_the_runner_with_a_prediction(tmp_path, embedded_model_dir, method, drafter):
    """transformers verifies a draft in every target forward, its prefill included: the
    prediction's draft-length shares must count that forward as a step."""
    from specdec import runner
    from specdec.config import expand_matrix, validate

    entry = {"method": method, "gamma": 4} | ({"drafter": drafter} if drafter else {})
    config = validate({
        "seed": 1, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"int8": {"kind": "quantized", "dtype": "int8"}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
        "experiments": {"peer": {"target": "smollm2", "datasets": ["sample"], "methods": [entry],
                                 "max_new_tokens": 12, "temperature": 0.8, "warmup": 0}},
        "power": {"enabled": False},
    })
    (cell,) = expand_matrix(config)
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=1)
    result = runner.run_cell(cell, prompts, tmp_path / "out", models_dir=models_dir)
    assert result["status"] == "ok", result.get("failure")
    theory = result["theory"]
    assert sum(theory["draft_length_shares"]) == pytest.approx(1.0)
    if method == "hf_assisted":  # gamma drafts in every forward but a length-capped last one
        assert theory["draft_length_shares"][4] >= 0.5
    assert theory["predicted_speedup"] > 0
