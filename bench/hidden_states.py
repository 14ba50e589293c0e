"""What the hidden states an EAGLE-3 head reads cost the target: our engine's decode step of
the embedded model with `hidden_ids=()` (every cell without a head) and with vLLM's default
auxiliary layers (2, L//2, L-3), side by side (issue 29, point 1: cells that need no hidden
states pay nothing for them; this says what the cells that need them pay).

One process, one model load; each round times a block of steps of each kind on a cached
prompt (bench/gpu_speed.py's `cached_step_s`), the order alternating round by round, so a
noisy shared machine slows both alike. Prints each kind's median step and the median over
rounds of the round's ratio with / without.

    python bench/hidden_states.py                      # batch 1 and 4, 64-token prompt, 9 rounds
    python bench/hidden_states.py --batches 1 --rounds 5 --repeats 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch
from gpu_speed import cached_step_s, target_step  # bench/, beside this script
from transformers import AutoModelForCausalLM

from specdec.decoding.cache import RaggedCache
from specdec.decoding.eagle3 import default_aux_ids
from specdec.prepare.models import prepare_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=20, help="steps per kind per round")
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's own; 1 on a busy shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(prepare_embedded(), dtype=torch.float32).eval()
    aux = default_aux_ids(model.config.num_hidden_layers)
    print(f"embedded model, float32, CPU, {torch.get_num_threads()} threads; decode step after a {args.prompt_tokens}-token "
          f"prompt; hidden_ids () vs {aux}; {args.rounds} rounds x {args.repeats} steps of each")
    torch.manual_seed(0)
    for batch in args.batches:
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens))
        with torch.inference_mode():
            steps = {ids: target_step(RaggedCache.prefill(model, prompt, torch.ones_like(prompt), hidden_ids=ids)[0], prompt[:, -1:])
                     for ids in ((), aux)}
            times = {ids: [] for ids in steps}
            for round_ in range(args.rounds):
                for ids in (steps if round_ % 2 == 0 else reversed(list(steps))):
                    times[ids].append(cached_step_s(steps[ids], 1, prompt.device, args.repeats))
        plain, hidden = (statistics.median(times[ids]) for ids in ((), aux))
        ratios = [h / p for p, h in zip(times[()], times[aux])]
        print(f"batch {batch}: step without hidden states {plain * 1e3:.2f} ms, with {aux} {hidden * 1e3:.2f} ms; "
              f"with / without: {statistics.median(ratios):.3f} (median of rounds; {min(ratios):.3f} to {max(ratios):.3f})", flush=True)


if __name__ == "__main__":
    main()
