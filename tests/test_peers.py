"""transformers' generate() as an engine: same outputs as ours under greedy decoding, counts
derived from streamer chunks, batch > 1 drafting cells recorded not_supported."""

import pytest
import torch
from conftest import cell_inputs, greedy_settings

from specdec.decoding import GenerationSettings, generate
from specdec.engines.transformers import hf_generate

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def setup(embedded_model):
    model, tokenizer = embedded_model
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ["Write a Python function that adds two numbers.", "What is the capital of France? One word."]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    settings = greedy_settings(tokenizer, NEW_TOKENS)
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


@pytest.mark.parametrize("method, drafter", [("speculative", "int8"), ("ngram", "ngram")])
def test_transformers_cells_run_through_the_runner_with_the_predictions_inputs(tmp_path, embedded_model_dir, method, drafter):
    """transformers verifies a draft in every target forward, its prefill included: the
    prediction's draft-length shares must count that forward as a step; its forwards are
    timed like ours, its accept step (inside generate()) cannot be."""
    from specdec.job import runner
    from specdec.gate.config import expand_matrix, validate

    entry = {"method": method, "gamma": 4, "drafter": drafter, "engine": "transformers"}
    config = validate({
        "seed": 1, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"int8": {"kind": "quantized", "dtype": "int8"}, "ngram": {"kind": "ngram", "n": 3}},
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
    assert result["engine"]["name"] == "transformers" and result["engine"]["settings"]
    if method == "speculative":  # gamma drafts in every forward but a length-capped last one
        assert theory["draft_length_shares"][4] >= 0.5
    attribution = result["attribution"]
    assert attribution["available"] and attribution["parts_s"]["accept"] is None
    assert "generate()" in attribution["not_separable"]["accept"]
    assert attribution["forwards"]["target_decode"] and attribution["parts_s"]["verify"] > 0
    if method == "speculative":  # the int8 assistant's forwards are the drafter's
        assert attribution["forwards"]["drafter"] and attribution["parts_s"]["drafter"] > 0


def test_transformers_drafting_above_batch_1_is_not_supported_without_loading(tmp_path):
    """The job writes the row at once: no model folder is even needed."""
    from specdec.job import runner
    from specdec.gate.config import expand_matrix, validate

    config = validate({
        "seed": 1, "models": {"smollm2": {"source": "embedded"}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
        "drafters": {"ngram": {"kind": "ngram", "n": 3}},
        "experiments": {"peer": {"target": "smollm2", "datasets": ["sample"], "batch_size": 2, "engine": "transformers",
                                 "methods": [{"method": "ngram", "drafter": "ngram", "gamma": 4}]}},
    })
    (cell,) = expand_matrix(config)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "sample/a", "dataset": "sample", "category": "c", "system": null, "turns": ["hi"], "prompt_tokens": 5}\n')
    result = runner.run_cell(cell, prompts, tmp_path / "out", models_dir=tmp_path / "no-models")
    assert result["status"] == "not_supported" and result["failure"]["phase"] == "setup"
    assert "batch size 1 only; batch_size is 2" in result["failure"]["message"]
    assert (tmp_path / "out" / "result.json").is_file() and (tmp_path / "out" / "requests.jsonl").read_text() == ""
