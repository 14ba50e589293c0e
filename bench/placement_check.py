"""Load target and drafter under each placement strategy, run a few decode steps, print maps.

    python bench/placement_check.py --strategy cpu
    python bench/placement_check.py --strategy same separate auto --drafter bf16
    python bench/placement_check.py --strategy multi_gpu_ratio --ratio 3 1 \\
        --target meta-llama/Llama-3.1-70B-Instruct --drafter meta-llama/Llama-3.2-1B-Instruct

On a machine whose jobs are not pinned (no CUDA_VISIBLE_DEVICES) it first leases the GPUs
the most demanding strategy needs. Exits 1 if any strategy fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from specdec.decoding.cache import RaggedCache
from specdec.engines.placement import (
    STRATEGIES,
    PlacementError,
    gpus_required,
    input_device,
    model_info,
    plan_placement,
    resolve_local_gpus,
)
from specdec.gate.cells import Placement
from specdec.job.gpus import GpuLeaseError, lease_gpus
from specdec.prepare.models import EMBEDDED_DIR, prepare_embedded

EMBEDDED = EMBEDDED_DIR
PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", nargs="+", default=["cpu"], choices=STRATEGIES)
    parser.add_argument("--target", default=str(EMBEDDED), help="model folder or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--drafter", default="bf16", help="'bf16' (a bfloat16 copy of the target), 'none', or a model folder / hub id")
    parser.add_argument("--dtype", default="float32", help="the target's dtype (default float32)")
    parser.add_argument("--ratio", nargs=2, type=int, metavar=("T", "D"), default=[1, 1], help="GPUs for multi_gpu_ratio")
    parser.add_argument("--gpus", type=int, help="GPUs for same / auto")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per model")
    return parser.parse_args(argv)


def placement_for(strategy: str, args) -> Placement:
    if strategy == "multi_gpu_ratio":
        return Placement(strategy, ratio=tuple(args.ratio))
    if strategy in ("same", "auto") and args.gpus:
        return Placement(strategy, gpus=args.gpus)
    return Placement(strategy)


def drafter_source(args) -> tuple[str, str] | None:
    """(where to load it from, its dtype), or None without a drafter."""
    if args.drafter == "none":
        return None
    if args.drafter == "bf16":
        return args.target, "bfloat16"
    return args.drafter, args.dtype


def decode_steps(model, tokenizer, steps: int) -> tuple[list[int], float]:
    """Greedy decode from the prompt on the model's input device; returns the tokens and the
    seconds they took, prefill included."""
    import torch

    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = encoded["input_ids"].to(input_device(model))
    tokens = []
    start = time.perf_counter()
    with torch.inference_mode():
        cache, logits = RaggedCache.prefill(model, ids, torch.ones_like(ids, dtype=torch.bool))
        for step in range(steps):
            if step:  # the prefill gave the first token's logits
                logits = cache.extend(ids, torch.ones_like(ids, dtype=torch.bool))[:, -1]
            ids = logits.argmax(-1)[:, None]
            tokens.append(int(ids))
    return tokens, time.perf_counter() - start


def check(strategy: str, args, gpus, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    drafter_at = drafter_source(args)
    target = model_info(args.target, dtype=args.dtype, name="target")
    drafter = model_info(drafter_at[0], dtype=drafter_at[1], name="drafter") if drafter_at else None
    placement = plan_placement(placement_for(strategy, args), gpus, target, drafter)
    print(f"== {strategy}: GPUs {list(placement.gpus) or 'none'}")
    loaded = {}
    for role, info, plan in (("target", target, placement.target), ("drafter", drafter, placement.drafter)):
        if info is None:
            continue
        source = args.target if role == "target" else drafter_at[0]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=info.dtype, **plan.load_kwargs()).eval()
        if input_device(model) != plan.input_device:
            raise PlacementError(f"{strategy}: {role}'s inputs belong on {input_device(model)}, the plan said {plan.input_device}")
        tokens, seconds = decode_steps(model, tokenizer, args.steps)
        device_map = getattr(model, "hf_device_map", None) or {"": str(model.device)}
        print(f"  {role}: {info.param_bytes / 2**30:.2f} GiB, {info.num_layers} layers, inputs on {plan.input_device}, "
              f"{args.steps} steps in {seconds:.2f} s (prefill included), tokens {tokens}")
        print(f"    device map: {summarise(device_map)}")
        loaded[role] = tokens
    if "drafter" in loaded:
        # The decode loop moves the drafter's tokens to the target's input device.
        moved = torch.tensor(loaded["drafter"]).to(placement.target.input_device)
        agree = int((moved == torch.tensor(loaded["target"], device=placement.target.input_device)).sum())
        print(f"  drafter tokens moved to {placement.target.input_device}: {agree}/{len(moved)} equal the target's")
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarise(device_map: dict) -> str:
    """Runs of consecutive modules on one device, e.g. 'model.embed_tokens..model.layers.14 -> 0'."""
    runs: list[list] = []
    for name, device in device_map.items():
        if runs and runs[-1][2] == device:
            runs[-1][1] = name
        else:
            runs.append([name or "<all>", name or "<all>", device])
    return "; ".join(f"{first}..{last} -> {dev}" if first != last else f"{first} -> {dev}" for first, last, dev in runs)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.target == str(EMBEDDED):
        prepare_embedded(EMBEDDED)
    needs = {s: gpus_required(placement_for(s, args), args.drafter != "none") for s in args.strategy}
    # Lease for the most demanding strategy the machine can hold; the others are reported, not run.
    lease, errors = None, []
    for count in sorted(set(needs.values()), reverse=True):
        try:
            lease = lease_gpus(count, label="placement_check")
            break
        except GpuLeaseError as error:
            errors.append(str(error))
    if lease is None:
        print(f"error: placement {' '.join(args.strategy)}: {'; '.join(errors)}", file=sys.stderr)
        return 2
    print(f"GPUs: {lease.describe()}")
    failed = False
    for strategy, count in needs.items():
        if count > len(lease.gpus):
            print(f"== {strategy}: FAILED: needs {count} GPU(s); {errors[0]}", file=sys.stderr)
            failed = True

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    gpus = resolve_local_gpus()
    for strategy in (s for s, count in needs.items() if count <= len(lease.gpus)):
        try:
            check(strategy, args, gpus, tokenizer)
        except PlacementError as error:
            print(f"== {strategy}: FAILED: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
