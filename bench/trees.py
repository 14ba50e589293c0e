"""Token trees on the embedded model, batch 1: what the tree path costs a chain, and the
verify cost v(N) of scoring N draft nodes in one target forward.

1. A chain through the tree code (today's engine: a chain is the tree of width 1) against
   the chain path before trees (the engine of commit `--baseline`, loaded from git into a
   temporary package), interleaved in one process over the same prompts, greedy, for the
   bf16 draft model and the n-gram drafter; plus the same chain forced through the explicit
   tree mask (a 4D mask and the path gather, as a tree of width 1 would run without the
   causal shortcut). Prints tokens/s per variant, the ratios and whether outputs are equal.
2. v(N): one verification step (the target forward over [last token, N nodes] under the
   tree mask, `verify`, and keeping the accepted path) for N = 1, 2, 4, ..., 64, the tree
   a breadth-first binary tree; beside it the same width as a causal chain. Median of
   `--reps` after a warm-up, relative to an AR step (one token): `decoding.verify_cost`,
   which bench/gpu_speed.py runs on an 8B-shaped target.

    python bench/trees.py                 # 2 prompts, 64 new tokens, 2 rounds; reps 20
    python bench/trees.py --quick         # 1 prompt, 32 new tokens, 1 round; reps 8
    python bench/trees.py --threads 1     # on a machine other jobs share
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from specdec.decoding import GenerationSettings, ModelDrafter, NgramDrafter, generate  # noqa: E402
from specdec.decoding.kernels import decode_kernels  # noqa: E402
from specdec.decoding.sampling import Draft  # noqa: E402
from specdec.decoding.trees import chain_parents  # noqa: E402
from specdec.decoding.verify_cost import NODES, verify_costs  # noqa: E402
from specdec.metadata import cpu_description  # noqa: E402
from specdec.prepare.models import load_tokenizer, prepare_embedded, quantized_copy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINE = "5a46ea6"  # main before token trees
PROMPTS = [
    'def fibonacci(n: int) -> list[int]:\n    """Return the first n Fibonacci numbers."""\n',
    "Write a Python function that checks whether a string is a palindrome.",
]


def baseline_decoding(revision: str, folder: Path):
    """The `specdec.decoding` package of `revision`, importable as `baseline.decoding`."""
    package = folder / "baseline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "src/specdec/decoding", "src/specdec/io.py"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder), "--strip-components=2"], input=archive, check=True)
    (folder / "decoding").rename(package / "decoding")
    (folder / "io.py").rename(package / "io.py")
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline.decoding")


class ExplicitTree:
    """A drafter whose chains reach the target as explicit trees of width 1 (parents given):
    the tree mask and the path gather, without the causal shortcut."""

    def __init__(self, drafter):
        self.drafter, self.model, self.hidden_ids = drafter, drafter.model, drafter.hidden_ids
        self.tree, self.dynamic = drafter.tree, drafter.dynamic  # a chain drafter's: no per-node counts

    def max_nodes(self, gamma):
        return self.drafter.max_nodes(gamma)

    def start(self, *args):
        session = self.drafter.start(*args)
        propose = session.propose

        def as_tree(last_tokens, gamma):
            draft = propose(last_tokens, gamma)
            return Draft(draft.tokens, draft.lengths, draft.probs, chain_parents(*draft.tokens.shape, draft.tokens.device))

        session.propose = as_tree
        return session


def chain_costs(target, tokenizer, bf16, old, args) -> None:
    settings = GenerationSettings(max_new_tokens=args.new_tokens, gamma=4, eos_token_ids=(tokenizer.eos_token_id,),
                                  pad_token_id=tokenizer.pad_token_id)
    old_settings = old.GenerationSettings(max_new_tokens=args.new_tokens, gamma=4, eos_token_ids=(tokenizer.eos_token_id,),
                                          pad_token_id=tokenizer.pad_token_id)
    runs = {
        "bf16 chain, before trees": lambda e: old.generate(target, e.input_ids, e.attention_mask, old_settings,
                                                          old.ModelDrafter(bf16)),
        "bf16 chain, tree code": lambda e: generate(target, e.input_ids, e.attention_mask, settings, ModelDrafter(bf16)),
        "bf16 chain, explicit tree": lambda e: generate(target, e.input_ids, e.attention_mask, settings,
                                                       ExplicitTree(ModelDrafter(bf16))),
        "ngram chain, before trees": lambda e: old.generate(target, e.input_ids, e.attention_mask, old_settings,
                                                           old.NgramDrafter()),
        "ngram chain, tree code": lambda e: generate(target, e.input_ids, e.attention_mask, settings, NgramDrafter()),
        "ngram chain, explicit tree": lambda e: generate(target, e.input_ids, e.attention_mask, settings,
                                                        ExplicitTree(NgramDrafter())),
    }
    texts = [PROMPTS[0]] + [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                          add_generation_prompt=True) for p in PROMPTS[1:]]
    singles = [tokenizer([t], return_tensors="pt") for t in texts[: args.prompts]]
    totals, outputs = defaultdict(lambda: [0, 0.0]), defaultdict(list)
    for run in runs.values():
        run(singles[0])  # warm-up
    for _ in range(args.rounds):
        for e in singles:
            for name, run in runs.items():
                started = time.perf_counter()
                rows = run(e)
                totals[name][1] += time.perf_counter() - started
                totals[name][0] += sum(len(r.output_ids) for r in rows)
                outputs[name].extend(r.output_ids for r in rows)
    print(f"1. chains, batch 1, greedy, gamma 4: {len(singles)} prompts x {args.rounds} rounds, {args.new_tokens} new tokens")
    print(f"{'variant':<30}{'tokens':>8}{'tok/s':>9}")
    for name, (tokens, seconds) in totals.items():
        print(f"{name:<30}{tokens:>8}{tokens / seconds:>9.2f}")
    for drafter in ("bf16", "ngram"):
        base = f"{drafter} chain, before trees"
        for variant in ("tree code", "explicit tree"):
            name = f"{drafter} chain, {variant}"
            ratio = (totals[name][0] / totals[name][1]) / (totals[base][0] / totals[base][1])
            print(f"{name + ' / before trees':<46}{ratio:>7.3f}x  outputs identical: {outputs[name] == outputs[base]}")


def print_verify_costs(target, tokenizer, args) -> None:
    ids = tokenizer([PROMPTS[0]], return_tensors="pt")
    costs = verify_costs(target, ids.input_ids, ids.attention_mask, NODES, args.reps)
    print(f"\n2. v(N) on the embedded model, batch 1 (median of {args.reps}); AR step {costs['ar_s'] * 1e3:.1f} ms")
    print(f"{'N nodes':>8}{'tree step ms':>14}{'v(N)/AR':>9}{'causal ms':>11}{'tree/causal':>13}")
    for n, cost in costs["nodes"].items():
        print(f"{n:>8}{cost['tree_s'] * 1e3:>14.1f}{cost['v']:>9.2f}{cost['causal_s'] * 1e3:>11.1f}{cost['tree_over_causal']:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 prompt, 32 new tokens, 1 round, 8 reps")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--baseline", default=BASELINE, help="the git revision of the chain path before trees")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared, busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new_tokens, args.rounds, args.reps = 1, 32, 1, 8
    folder = prepare_embedded()
    tokenizer = load_tokenizer(folder)
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bf16 = quantized_copy(target, "bf16")
    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory() as scratch:
        old = baseline_decoding(args.baseline, Path(scratch))
        with torch.inference_mode():
            chain_costs(target, tokenizer, bf16, old, args)
            with decode_kernels(target):
                print_verify_costs(target, tokenizer, args)


if __name__ == "__main__":
    main()
