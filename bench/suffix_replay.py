"""A suffix drafter's tokens per target forward (τ) without a model: a greedy cell's outputs
replayed through our `SuffixDrafter` and through arctic-inference's `SuffixDecodingCache`
(vLLM's `suffix` method), each draft scored against the known output.

Greedy decoding is lossless, so every method's output is AR's. At each step a drafter sees
the prompt and the output so far, drafts up to gamma tokens, keeps its longest prefix that
equals the output, and the step emits that prefix and one more token. The measured request
order of the cell is kept, with its warm-up requests left out (our engine's rule) or fed
first (`--with-warmup`: what vLLM's cache keeps). Only first turns are replayed: a later
turn's prompt holds the model's earlier answers as text.

    .venv-vllm/bin/python bench/suffix_replay.py results/runs/copying/code_edit--specdec-suffix-suffix-g8--b1-n128-t0-cpu--r0
    .venv-vllm/bin/python bench/suffix_replay.py RUN_DIR --with-warmup --drafters arctic

`ours` runs in either environment; `arctic` needs vLLM's environment with arctic-inference
(`make install-vllm ARCTIC=arctic-inference==0.3.0`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from specdec.decoding.suffix import SuffixDrafter, SuffixTrie
from specdec.records import read_cell, read_requests

try:  # vLLM's environment with arctic-inference only
    from arctic_inference.suffix_decoding import SuffixDecodingCache
except ImportError:
    SuffixDecodingCache = None


class Ours:
    def __init__(self, depth: int, factor: float, min_prob: float, cache_tokens: int):
        self.drafter = SuffixDrafter(max_depth=depth, max_spec_factor=factor, min_token_prob=min_prob, cache_tokens=cache_tokens)

    def start(self, key, prompt: list[int]) -> None:
        self.trie = SuffixTrie(self.drafter.depth)
        self.trie.extend(prompt)

    def add(self, key, tokens: list[int]) -> None:
        self.trie.extend(tokens)

    def draft(self, key, text: list[int], gamma: int) -> list[int]:
        return self.drafter.propose(self.trie, text, self.drafter.shape(gamma))[0]

    def stop(self, key, output: list[int]) -> None:
        self.drafter.cache.add(output)


class Arctic:
    def __init__(self, depth: int, factor: float, min_prob: float, cache_tokens: int):
        if SuffixDecodingCache is None:
            raise SystemExit("arctic-inference is not installed here: run with .venv-vllm/bin/python after "
                             "`make install-vllm ARCTIC=arctic-inference==0.3.0`")
        self.cache = SuffixDecodingCache(max_tree_depth=depth, max_cached_requests=10_000)
        self.depth, self.factor, self.min_prob = depth, factor, min_prob

    def start(self, key, prompt: list[int]) -> None:
        self.cache.start_request(key, prompt)

    def add(self, key, tokens: list[int]) -> None:
        self.cache.add_active_response(key, tokens)

    def draft(self, key, text: list[int], gamma: int) -> list[int]:
        return self.cache.speculate(key, text[-self.depth :], max_spec_tokens=gamma, max_spec_factor=self.factor,
                                    min_token_prob=self.min_prob).token_ids

    def stop(self, key, output: list[int]) -> None:
        self.cache.stop_request(key)


def replay(drafter, requests: list[dict], prompts: dict[str, list[int]], gamma: int) -> tuple[int, int]:
    """(output tokens, target forwards) of the measured requests, the prefill a forward."""
    tokens = forwards = 0
    for key, request in enumerate(requests):
        output = request["output_ids"]
        text = [*prompts[request["prompt_id"]], *output[:1]]
        drafter.start(key, prompts[request["prompt_id"]])
        drafter.add(key, output[:1])
        done, steps = 1, 1
        while done < len(output):
            draft = drafter.draft(key, text, max(1, min(gamma, len(output) - done - 1)))
            kept = 0
            while kept < len(draft) and done + kept < len(output) and draft[kept] == output[done + kept]:
                kept += 1
            new = output[done : done + kept + 1]
            drafter.add(key, new)
            text += new
            done, steps = done + len(new), steps + 1
        drafter.stop(key, output)
        if not request["warmup"]:
            tokens, forwards = tokens + len(output), forwards + steps
    return tokens, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a greedy suffix cell's folder (cell.json, requests.jsonl)")
    parser.add_argument("--prompts", type=Path, help="the dataset's prompts (default: results/prompts/DATASET.jsonl)")
    parser.add_argument("--model", type=Path, help="the target's folder, for its chat template (default: resources/models/TARGET)")
    parser.add_argument("--with-warmup", action="store_true", help="feed the warm-up requests' outputs to the cache first")
    parser.add_argument("--drafters", nargs="+", choices=("ours", "arctic"), default=["ours", "arctic"])
    args = parser.parse_args()

    cell = read_cell(args.run_dir / "cell.json")
    spec = cell.drafter
    tokenizer = AutoTokenizer.from_pretrained(args.model or Path("resources/models") / cell.target.name)
    conversations = [json.loads(line) for line in (args.prompts or Path(f"results/prompts/{cell.dataset}.jsonl")).open()]
    prompts = {}
    for conversation in conversations:
        system = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
        text = tokenizer.apply_chat_template([*system, {"role": "user", "content": conversation["turns"][0]}],
                                             add_generation_prompt=True, tokenize=False)
        prompts[conversation["id"]] = tokenizer(text, add_special_tokens=False)["input_ids"]
    requests = [r for r in read_requests(args.run_dir / "requests.jsonl") if r.get("turn", 1) == 1
                and (args.with_warmup or not r["warmup"])]
    for request in requests:
        if len(prompts[request["prompt_id"]]) != request["prompt_tokens"]:
            raise SystemExit(f"{request['request_id']}: the templated prompt has {len(prompts[request['prompt_id']])} "
                             f"tokens, the cell's {request['prompt_tokens']}: not the cell's tokenizer or template")
    for name in args.drafters:
        drafter = {"ours": Ours, "arctic": Arctic}[name](spec.max_depth, spec.max_spec_factor, spec.min_token_prob, spec.cache_tokens)
        tokens, forwards = replay(drafter, requests, prompts, cell.gamma)
        print(f"{name:7s} {'with' if args.with_warmup else 'without'} warm-up output: {tokens} tokens in "
              f"{forwards} target forwards, tau {tokens / forwards:.2f}")


if __name__ == "__main__":
    main()
