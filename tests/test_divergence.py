"""Divergence triage: a greedy output that differs from its AR reference is a near-tie (the
target's top-2 logit margin under the dtype's and device's threshold) or a defect, and a
defect fails the cell's correctness in the result, the summary and its display."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specdec.report.aggregate import read_runs, runs_table
from specdec.job.analysis import NEAR_TIE_MARGIN, compare_with_reference, near_tie_margin, verdict
from specdec.records import read_result, result_from_dict, write_result
from specdec.report.summary import summary_table
from specdec.report.tables import display_summary

FIXTURES = Path(__file__).parent / "fixtures" / "results" / "runs" / "demo"
SPEC = "humaneval--specdec-speculative-int8-g4--b1-n16-t0-cpu"


def fixture_cell(dtype="float32", strategy="cpu"):
    cell = read_result(FIXTURES / f"{SPEC}--r0" / "result.json").config
    return dataclasses.replace(cell, target=dataclasses.replace(cell.target, dtype=dtype),
                               placement=dataclasses.replace(cell.placement, strategy=strategy))


class FixedLogits(torch.nn.Module):
    """A 'target' whose last-position logits are given: the margin is known by hand."""

    def __init__(self, logits):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 2)
        self.last = torch.tensor(logits)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        logits = torch.zeros(1, ids.shape[1], len(self.last))
        logits[0, -1] = self.last
        return SimpleNamespace(logits=logits)


def request(rid, output_ids):
    return {"request_id": rid, "prompt_id": rid, "category": None, "turn": 1, "warmup": False, "prompt_tokens": 2,
            "output_tokens": len(output_ids), "arrival_s": 0.0, "start_s": 0.0, "first_token_s": 0.1, "finish_s": 0.2,
            "emissions": [[0.1, 1], [0.2, len(output_ids) - 1]], "output_ids": output_ids}


def test_thresholds_follow_dtype_and_device():
    assert near_tie_margin(fixture_cell()) == NEAR_TIE_MARGIN[("float32", "cpu")] == 1e-3
    assert near_tie_margin(fixture_cell(strategy="same")) == NEAR_TIE_MARGIN[("float32", "cuda")] == 1e-2
    assert near_tie_margin(fixture_cell("bfloat16", "separate")) == 2.0
    assert near_tie_margin(fixture_cell("float16")) == 0.25
    assert verdict(0.0, 1e-3) == "near-tie" and verdict(1e-3, 1e-3) == "defect"


@pytest.mark.parametrize("logits, dtype, margin, judged", [
    ([20.0, 20.0004, 3.0, -1.0], "float32", 0.0004, "near-tie"),  # fp32 rounding on the CPU
    ([20.0, 19.9, 3.0, -1.0], "float32", 0.1, "defect"),  # fp32 cannot round 0.1 away
    ([20.0, 19.9, 3.0, -1.0], "bfloat16", 0.1, "near-tie"),  # under one bf16 step (0.125) at 20
    ([20.0, 18.5, 3.0, -1.0], "bfloat16", 1.5, "near-tie"),  # what 30 bf16 layers round to
    ([20.0, 18.5, 3.0, -1.0], "float16", 1.5, "defect"),
    ([12.0, 3.0, 9.0, -1.0], "bfloat16", 3.0, "defect"),
])
def test_verdict_from_hand_made_logits(logits, dtype, margin, judged):
    ours, theirs = [5, 6, 7], [5, 6, 1]
    session = SimpleNamespace(cell=fixture_cell(dtype), target=FixedLogits(logits), prompt_ids={"a#1": [1, 2], "b#1": [1, 2]})
    block = compare_with_reference(session, [request("a#1", ours), request("b#1", [4, 4])], [request("a#1", theirs), request("b#1", [4, 4])], "ref.jsonl")
    (divergence,) = block["divergences"]
    assert (divergence["request_id"], divergence["position"], divergence["ours"], divergence["reference"]) == ("a#1", 2, [7], [1])
    assert divergence["target_top2_gap"] == pytest.approx(margin, abs=1e-5)
    assert divergence["verdict"] == judged
    defects = int(judged == "defect")
    assert (block["near_ties"], block["defects"], block["status"]) == (1 - defects, defects, "failed" if defects else "passed")
    assert block["requests_compared"] == 2 and not block["identical"]


def test_a_forced_divergence_on_the_embedded_model_is_judged(embedded_model):
    """Our output is the real greedy continuation; the 'reference' is forced off it at
    position 3. The margin is recomputed on the shared prefix, and a real greedy choice of
    the fp32 model is far from a tie, so the verdict is a defect."""
    model, tokenizer = embedded_model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Count from one to ten."}],
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
        top = torch.topk(model(torch.tensor([prompt + ours[:3]])).logits[0, -1], 2)
    forced = ours[:3] + [int(top.indices[1])] + ours[4:]
    session = SimpleNamespace(cell=fixture_cell(), target=model, prompt_ids={"p#1": prompt, "q#1": prompt})
    block = compare_with_reference(session, [request("p#1", ours), request("q#1", ours)], [request("p#1", forced), request("q#1", ours)], "ref.jsonl")
    (divergence,) = block["divergences"]
    assert divergence["position"] == 3 and divergence["ours"] == [ours[3]] and divergence["reference"] == [forced[3]]
    assert divergence["target_top2_gap"] == pytest.approx(float(top.values[0] - top.values[1]), rel=1e-4)
    assert divergence["target_top2_gap"] > block["near_tie_threshold"] == 1e-3
    assert divergence["verdict"] == "defect" and block["status"] == "failed" and block["defects"] == 1


def test_a_vllm_cell_judges_with_its_lazily_loaded_target(tmp_path, embedded_model_dir):
    """vLLM's logits stay in its engine process: the session loads a transformers copy of the
    target on first use, and the verdict follows the cell's dtype (bf16: a wider margin)."""
    from specdec.engines.vllm import VllmEngine, VllmPlan

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2").symlink_to(embedded_model_dir)
    session = VllmEngine(cell=fixture_cell("bfloat16"), tokenizer=None, plan=VllmPlan(device="cpu"), args={},
                          context_limit=2048, environment={}, models_dir=tmp_path / "models",
                          prompt_ids={"p#1": [1, 9690, 198]})
    block = compare_with_reference(session, [request("p#1", [28, 31, 30])], [request("p#1", [28, 29, 30])], "ref.jsonl")
    assert next(session.target.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        top = torch.topk(session.target(torch.tensor([[1, 9690, 198, 28]])).logits[0, -1].float(), 2).values
    (divergence,) = block["divergences"]
    assert divergence["position"] == 1 and block["near_tie_threshold"] == 2.0
    assert divergence["target_top2_gap"] == pytest.approx(float(top[0] - top[1]))
    assert divergence["verdict"] == verdict(divergence["target_top2_gap"], 2.0)


def test_a_defect_fails_the_cell_in_the_summary(tmp_path):
    """One repeat with a defect and a near-tie: the runs table carries the counts, the summary
    sums them and flags the cell, and its display (the report's summary table) shows both."""
    paths = []
    for folder in sorted(FIXTURES.iterdir()):
        result = json.loads((folder / "result.json").read_text())
        if folder.name == f"{SPEC}--r1":
            result["correctness"] |= {
                "identical": False, "near_tie_threshold": 1e-3, "near_ties": 1, "defects": 1, "status": "failed",
                "divergences": [
                    {"request_id": "a#1", "position": 4, "ours": [9], "reference": [8], "target_top2_gap": 2e-4, "verdict": "near-tie"},
                    {"request_id": "b#1", "position": 0, "ours": [3], "reference": [5], "target_top2_gap": 2.5, "verdict": "defect"},
                ]}
        path = tmp_path / folder.name / "result.json"
        path.parent.mkdir()
        write_result(path, result_from_dict(result, str(path)))
        paths.append(path)
    runs = runs_table(read_runs(paths))
    failed = runs[runs["cell"] == f"{SPEC}--r1"].iloc[0]
    assert (failed["correctness_status"], failed["correctness_near_ties"], failed["correctness_defects"]) == ("failed", 1, 1)
    summary = summary_table(runs, n_resamples=200)
    row = summary[summary["cell"] == SPEC].iloc[0]
    assert (row["near_ties"], row["defects"]) == (1, 1)
    assert "correctness failed: 1 defect" in row["flags"]
    clean = summary[summary["cell"] == "humaneval--specdec-ngram-ngram-g4--b1-n16-t0-cpu"].iloc[0]
    assert "correctness failed" not in clean["flags"]
    shown = display_summary(summary).set_index("cell")
    assert shown.loc[SPEC, "defects"] == "1" and shown.loc[SPEC, "near-ties"] == "1"
    assert "correctness failed: 1 defect" in shown.loc[SPEC, "flags"]
