"""The served vLLM against the in-process vLLM engine: the same cells (AR, n-gram, the target
drafting for itself) run once by the `vllm` engine and once by the `openai` engine through a
server its job starts (`serve`), on code edits (answers that copy their input, so the n-gram
drafts). Prints, per method, whether the greedy outputs are identical token for token and
whether the spec-decode counters over the window are equal (vLLM's own, differenced; the
served ones scraped from /metrics). Six vLLM engine starts: about ten minutes on a CPU.

Runs in vLLM's environment (`make install-vllm`), on the embedded model prepared by the
pipeline (resources/models/smollm2):

    nice .venv-vllm/bin/python bench/serve_agreement.py
    nice .venv-vllm/bin/python bench/serve_agreement.py --prompts 2 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from specdec.gate.config import expand_matrix, validate  # noqa: E402
from specdec.job.runner import run_cell  # noqa: E402
from specdec.prepare.datasets import prepare_dataset_file  # noqa: E402
from specdec.prepare.models import load_tokenizer  # noqa: E402
from specdec.records import read_requests  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--models-dir", default="resources/models")
    args = parser.parse_args()

    dataset = {"source": "humaneval_edit", "num_prompts": args.prompts, "max_prompt_tokens": 384}
    config = validate({
        "seed": 1, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"ngram": {"kind": "ngram", "n": 3, "min_context": 1}, "self": {"kind": "model", "model": "smollm2"}},
        "datasets": {"edit": dataset},
        "experiments": {"agreement": {
            "target": "smollm2", "datasets": ["edit"], "engine": ["vllm", "openai"], "placement": "cpu",
            "methods": [{"method": "ar"}, {"method": "ngram", "drafter": "ngram", "gamma": 3},
                        {"method": "speculative", "drafter": "self", "gamma": 2}],
            "max_new_tokens": args.new_tokens, "warmup": 1}},
        "power": {"enabled": False}, "openai": {"serve": {}},
    })
    models_dir = Path(args.models_dir)
    work = Path(tempfile.mkdtemp(prefix="specdec-agreement-"))
    prompts = work / "prompts.jsonl"
    prepare_dataset_file(dataset, load_tokenizer(str((models_dir / "smollm2").resolve())), prompts, seed=1)

    runs = {}
    for cell in expand_matrix(config):
        result = run_cell(cell, prompts, work / cell.name, models_dir=models_dir)
        if result["status"] != "ok":
            raise SystemExit(f"{cell.name}: {result['failure']}")
        outputs = {r["request_id"]: r["output_ids"] for r in read_requests(work / cell.name / "requests.jsonl") if not r["warmup"]}
        runs[cell.engine, cell.method] = outputs, (result["acceptance"] or {}).get("engine_counters")
        print(f"{cell.name}: counters {json.dumps(runs[cell.engine, cell.method][1])}", flush=True)

    print(f"\n{args.prompts} code edits x {args.new_tokens} tokens, greedy; in-process vLLM against served vLLM")
    for method in ("ar", "ngram", "speculative"):
        (ours, counted), (served, scraped) = runs["vllm", method], runs["openai", method]
        print(f"{method:12s} outputs identical: {ours == served}; counters equal: {counted == scraped}")
    print(f"(cells under {work})")


if __name__ == "__main__":
    main()
