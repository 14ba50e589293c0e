"""What specdec's harness costs vLLM: one vLLM engine, driven in turn by specdec (the load
generator and `engines.vllm.VllmServer`, with timestamps per step) and by a bare
`LLM.generate` over the same prompts, interleaved (A B B A ...) so that a noisy machine slows
both alike. Prints tokens/s of each round and the ratio specdec / bare (target >= 0.97).

Runs in vLLM's environment (`make install-vllm`), on the embedded model prepared by the
pipeline (resources/models/smollm2):

    .venv-vllm/bin/python bench/vllm_overhead.py                  # n-gram, batch 4, 3 round pairs
    .venv-vllm/bin/python bench/vllm_overhead.py --method ar --batch 1 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from specdec.engines.vllm import VllmEngine, VllmServer  # noqa: E402
from specdec.gate.cells import Cell, DrafterSpec, Generation, Load, ModelSpec, Placement  # noqa: E402
from specdec.job.load import Request, RequestStream, run_load  # noqa: E402
from specdec.prepare.datasets import prepare_prompts  # noqa: E402


def bench_cell(method: str, batch: int, new_tokens: int, gamma: int) -> Cell:
    drafter = {"ar": None, "ngram": DrafterSpec(name="ngram", kind="ngram", n=4, min_context=2),
               "speculative": DrafterSpec(name="self", kind="model", model=ModelSpec(name="smollm2", source="embedded"))}[method]
    return Cell(experiment="bench", dataset="sample", target=ModelSpec(name="smollm2", source="embedded"), method=method,
                drafter=drafter, gamma=gamma if drafter else 0, batch_size=batch,
                generation=Generation(max_new_tokens=new_tokens), placement=Placement(strategy="cpu"), load=Load(),
                repeat=0, seed=0, warmup=0, engine="vllm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["ar", "ngram", "speculative"], default="ngram")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="round pairs (specdec and bare once each)")
    parser.add_argument("--models-dir", default="resources/models")
    args = parser.parse_args()

    from vllm import LLM
    from vllm.sampling_params import RequestOutputKind

    cell = bench_cell(args.method, args.batch, args.new_tokens, args.gamma)
    session = VllmEngine.open(cell, Path(args.models_dir))
    os.environ.update(session.environment)
    llm = LLM(**session.args)
    session.engine = llm.llm_engine  # both sides drive this one engine
    spec = {"source": "sample", "num_prompts": args.prompts, "turns": "first"}
    conversations = prepare_prompts(spec, session.tokenizer, seed=0).records
    token_ids = [session.prompt_token_ids(Request(conversation)) for conversation in conversations]
    params = session.sampling_params()
    params.output_kind = RequestOutputKind.FINAL_ONLY  # what LLM.generate collects

    def through_specdec() -> tuple[int, float]:
        began = time.perf_counter()
        records = run_load(RequestStream.of(cell, conversations), VllmServer(session)).records
        return sum(r["output_tokens"] for r in records), time.perf_counter() - began

    def bare() -> tuple[int, float]:
        began = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - began

    bare()  # warm-up
    rates = {"specdec": [], "bare": []}
    for round_ in range(args.rounds):
        order = [("specdec", through_specdec), ("bare", bare)]
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            tokens, seconds = run()
            rates[name].append(tokens / seconds)
            print(f"round {round_ + 1} {name:8s} {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s", flush=True)
    ratio = statistics.median(rates["specdec"]) / statistics.median(rates["bare"])
    print(f"\n{args.method}, batch {args.batch}, {args.prompts} prompts x {args.new_tokens} tokens: "
          f"specdec / bare LLM.generate = {ratio:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
