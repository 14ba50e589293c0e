"""What time attribution (specdec/job/attribution.py) costs the timed figures: tokens/s of our
engine with the recorder on (forward hooks, accept-step brackets, decode clock) and off, on
the embedded model, AR and the int8 drafter.

One process, one model load; on and off alternate request by request (on first for even
prompts, off first for odd ones), so a noisy shared machine slows both alike. Prints tokens/s
per mode, their ratio on / off, and the median over adjacent on/off pairs of the pair's ratio
(robust to a burst of load from other jobs hitting one side of a few pairs).

    python bench/attribution_overhead.py                 # 4 prompts, 32 new tokens, 2 rounds
    python bench/attribution_overhead.py --prompts 2 --new-tokens 16 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from specdec.decoding import GenerationSettings, ModelDrafter, generate  # noqa: E402
from specdec.decoding.kernels import tuned_linears  # noqa: E402
from specdec.job.attribution import Attribution  # noqa: E402
from specdec.prepare.models import load_tokenizer, prepare_embedded, quantized_copy  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "Explain what a hash map is and when to use one.",
    "Write a Python function that checks whether a string is a palindrome.",
    "The three laws of thermodynamics are",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model = prepare_embedded()
    tokenizer = load_tokenizer(model)
    target = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    drafter = quantized_copy(target, "int8")
    for m in (target, drafter):  # the kernel choice times its own forwards: before any timed request
        tuned_linears(m)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, gamma=4, eos_token_ids=(tokenizer.eos_token_id,),
                                  pad_token_id=tokenizer.pad_token_id)
    inputs = [tokenizer([p], return_tensors="pt") for p in (PROMPTS * args.prompts)[: args.prompts]]
    methods = {"AR": None, "spec int8": drafter}
    totals = defaultdict(lambda: [0, 0.0])  # (method, mode) -> [tokens, seconds]
    pairs = defaultdict(list)  # method -> on/off ratio of tokens/s of each adjacent pair

    def run(name: str, on: bool, encoded) -> float:
        model_drafter = methods[name]
        recorder = Attribution(target, model_drafter, drafts=model_drafter is not None)
        if on:
            recorder.begin()
        began = time.perf_counter()
        with recorder.decode():
            rows = generate(target, encoded.input_ids, encoded.attention_mask, settings,
                            drafter=ModelDrafter(model_drafter) if model_drafter is not None else None,
                            accept_timer=recorder.accept if on else None)
        seconds = time.perf_counter() - began
        recorder.end()
        totals[name, on][0] += sum(len(r.output_ids) for r in rows)
        totals[name, on][1] += seconds
        return sum(len(r.output_ids) for r in rows) / seconds

    run("AR", True, inputs[0])  # warm-up, not counted
    totals.clear()
    for _ in range(args.rounds):
        for i, encoded in enumerate(inputs):
            for name in methods:
                speed = {on: run(name, on, encoded) for on in ((True, False) if i % 2 == 0 else (False, True))}
                pairs[name].append(speed[True] / speed[False])

    print(f"{'method':<10} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>8} {'median pair':>12}")
    for name in methods:
        off, on = (totals[name, mode][0] / totals[name, mode][1] for mode in (False, True))
        print(f"{name:<10} {off:>10.2f} {on:>10.2f} {on / off:>8.3f} {statistics.median(pairs[name]):>12.3f}")


if __name__ == "__main__":
    main()
