def test_tree_cells_compiled(tmp_path, embedded_model_dir):
    from conftest import cell_inputs, tiny_llama
    from specdec.job import runner
    from specdec.gate.config import expand_matrix, validate

    tiny_llama(tmp_path / "tiny", 49152, tokenizer_of=embedded_model_dir)
    config = validate({
        "models": {"smollm2": {"source": "local", "path": str(tmp_path / "tiny"), "compile": True}},
        "drafters": {"int8": {"kind": "quantized", "dtype": "int8", "compile": True, "tree": {"dynamic": {"top_k": 2, "depth": 2, "nodes": 4}}},
                     "ng": {"kind": "ngram", "n": 3, "min_context": 1, "tree": {"branching": [2, 1]}}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
        "experiments": {"tiny": {"target": "smollm2", "datasets": ["sample"], "max_new_tokens": 12, "warmup": 1, "batch_size": 2, "reference": "separate",
                                 "methods": [{"method": "ar"}, {"method": "speculative", "drafter": "int8", "gamma": 2},
                                             {"method": "ngram", "drafter": "ng", "gamma": 2}]}},
        "power": {"idle_s": 0},
    })
    models_dir, prompts = cell_inputs(tmp_path, embedded_model_dir, config["datasets"]["sample"], seed=3)
    cells = sorted(expand_matrix(config), key=lambda c: c.drafts)
    for cell in cells:
        result = runner.run_cell(cell, prompts, tmp_path / cell.method, models_dir=models_dir,
                                 reference=None if cell.method == "ar" else tmp_path / "ar" / "requests.jsonl")
        print(cell.name, result["status"], result.get("failure"), result.get("correctness"), result["engine"]["settings"].get("compile"), result.get("acceptance"))
        assert result["status"] == "ok"
