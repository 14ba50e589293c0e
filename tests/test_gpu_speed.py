"""bench/gpu_speed.py's pieces on the CPU: the real-architecture configs give models of the
published sizes, transformers' assisted generation with the replay assistant accepts
the replayed reference (all of it at error rate 0, none at 1) and stays lossless, and the
EAGLE-3 head's rows run at a shrunken shape (the head of the public 8B heads' shape), and so
does the token trees' v(N) sweep."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from specdec.decoding import GenerationSettings, generate
from specdec.decoding.verify_cost import binary_tree
from specdec.engines.transformers import hf_generate
from specdec.io import write_json

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, billions", [("llama-3.1-8b", 8.03), ("llama-3.2-1b", 1.24), ("qwen3-8b", 8.19), ("qwen3-0.6b", 0.60)])
def test_configs_give_models_of_the_published_size(bench, name, billions):
    model = bench.random_model(bench.model_config(name), "meta", torch.bfloat16)  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("error_rate", [0.0, 1.0])
def test_assisted_generation_with_the_replay_assistant_accepts_the_replay(bench, error_rate):
    torch.manual_seed(0)
    target = bench.random_model(bench.shrink(bench.model_config("llama-3.1-8b"), layers=1, hidden=128, vocab=512), "cpu", torch.float32)
    drafter = bench.random_model(bench.shrink(bench.model_config("llama-3.2-1b"), layers=1, hidden=64, vocab=512), "cpu", torch.float32)
    prompt = torch.randint(0, 512, (1, 8))
    settings = GenerationSettings(max_new_tokens=12, gamma=3)
    reference = hf_generate(target, prompt, torch.ones_like(prompt), settings)[0].output_ids
    assistant = bench.replay_assistant(drafter, reference, prompt.shape[1], error_rate, seed=0)
    row = hf_generate(target, prompt, torch.ones_like(prompt), settings, assistant_model=assistant)[0]
    assert row.output_ids == reference
    assert row.drafted_tokens > 0
    assert row.accepted_tokens == (row.drafted_tokens if error_rate == 0 else 0)
    assert generate(target, prompt, torch.ones_like(prompt), settings)[0].output_ids == reference


def test_the_eagle3_head_rows_run_at_a_shrunken_shape(bench):
    """The head's rows on a shrunken 8B (2 layers: its last three states as aux ids, a draft
    vocabulary of a quarter of its 512 ids); at full shape the head has the public heads' aux
    ids and draft vocabulary. Only that they ran and what they hold, never a timing."""
    assert bench.head_aux_ids(32) == (2, 16, 29) and bench.head_aux_ids(2) == (0, 1, 2)
    torch.manual_seed(0)
    target = bench.random_model(bench.shrink(bench.model_config("llama-3.1-8b"), layers=2, hidden=128, vocab=512), "cpu", torch.float32)
    assert bench.random_eagle3(target).head.spec.draft_vocab_size == 128
    table = bench.Table()
    shown = bench.eagle3_rows(table, target, prompt_len=8, new_tokens=6, batches=(1, 3), repeats=1, rounds=1)
    assert shown["identical"]  # the head's decode is AR's, token for token
    assert set(shown["c"]) == set(shown["hidden_cost"]) == {1, 3}
    assert all(set(step) == {"target", "target_hidden", "head"} for step in shown["steps"].values())
    assert [row[0] for row in table.rows] == [
        "EAGLE-3 head step / target step (c), batch 1", "target step with the head's hidden states (0, 1, 2) / without, batch 1",
        "EAGLE-3 head step / target step (c), batch 3", "target step with the head's hidden states (0, 1, 2) / without, batch 3",
        "ours spec EAGLE-3 head (random weights, gamma 4) / ours AR, batch 1"]


def test_the_tree_sweep_measures_v_of_n_on_each_step_path(bench, tmp_path):
    """v(N) on a shrunken 8B, through the growing and the static cache (the compiled path is
    CUDA only): a row per path, every N's tree, causal and AR step, and the rows as JSON.
    Only that they ran and what they hold, never a timing."""
    torch.manual_seed(0)
    target = bench.random_model(bench.shrink(bench.model_config("llama-3.1-8b"), layers=1, hidden=64, vocab=256), "cpu", torch.float32)
    prompt = torch.randint(0, 256, (1, 6))
    paths = {name: path for name, make in bench.ENGINE_VARIANTS.items() if (path := make(False)) is not None}
    assert set(paths) == {"ours", "ours static"}
    table = bench.Table()
    sweep = bench.tree_rows(table, target, prompt, paths, max_length=6 + 9, nodes=(1, 2, 8), repeats=1)
    assert [row[0] for row in table.rows] == [f"{name} tree verify step v(N) / AR step, N = 1, 2, 8" for name in paths]
    for costs in sweep.values():
        assert list(costs["nodes"]) == [1, 2, 8] and costs["ar_s"] > 0
        assert all(cost["tree_s"] > 0 and cost["causal_s"] > 0 and cost["v"] == cost["tree_s"] / costs["ar_s"]
                   for cost in costs["nodes"].values())
    write_json(tmp_path / "gpu.json", {"rows": table.as_json(), "verify_cost": sweep})
    assert json.loads((tmp_path / "gpu.json").read_text())["verify_cost"]["ours static"]["nodes"]["8"]["causal_s"] > 0


def test_the_binary_tree_of_n_nodes_is_breadth_first():
    assert binary_tree(1).paths == ((0,),)
    assert binary_tree(4).paths == ((0,), (1,), (0, 0), (0, 1))
    assert binary_tree(64).nodes == 64 and binary_tree(64).depth == 6
