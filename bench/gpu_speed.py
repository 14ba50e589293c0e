"""Issue 19's goals on one GPU, measured side by side in one process; one table of ratios.

    python bench/gpu_speed.py                          # CUDA: Llama-3.1-8B with a Llama-3.2-1B drafter
    python bench/gpu_speed.py --target qwen3-8b --drafter qwen3-0.6b
    python bench/gpu_speed.py --smoke                  # the CPU part at its smallest (tests)

Models of real shapes with random weights (bench/configs/*.json, the public config.json of
each; `random_model` initialises them on the device, nothing is downloaded). Timing is
meaningful with random weights, acceptance is not, so every speculative row drafts with the
replay drafter (`decoding.ReplayDrafter`, a measurement tool) at a set alpha: ours proposes
the reference continuation with each token wrong with probability 1 - alpha; transformers'
assisted generation gets the same drafter model with its logits overwritten by the same
replay (`replay_assistant`), each side replaying its own greedy AR output, so both pay the
1B-shaped drafter's forwards and both see alpha. Without CUDA the CPU part runs: the same
rows on scaled-down shapes (`shrink`) and a few tokens, with both compiled rows (ours and
transformers') left out (torch.compile on the CPU takes minutes); its ratios say the script
works, not what a GPU does. Every "ours" row is measured on each of our step paths
(`ENGINE_VARIANTS`: the growing cache, the static cache eager, and on CUDA the static cache
with compiled, graph-captured steps), interleaved round by round.

Rows: the device's copy bandwidth (read + write bytes of a device-to-device copy per
second) and the bound it sets (bf16 weight bytes / bandwidth); our AR decode step at batch 1
against that bound; our AR against `generate()` stock and with its static cache +
torch.compile (compile time excluded, printed apart); speculative with the replay at
alpha 0.8 on the 1B-shaped drafter against assisted generation (time per output token);
the embedded 135M model at batch 1; measured speedup over Leviathan's prediction for the
host-paced replay at alpha 0.6 and 0.8; an EAGLE-3 head with random weights, shaped as the
public heads for Llama-3.1-8B are (one layer, draft vocabulary 32,000, auxiliary layers
(2, 16, 29)): its draft step over the target's decode step (the cost ratio c) at batch 1
and larger batches, the target's step with the head's hidden states over its step without,
and a short speculative decode with the head on our engine (lossless: its outputs are AR's;
random weights accept nothing, so its speed is the head's overhead, not a speedup); and the
verify cost of token trees v(N) (`decoding.verify_cost`): the target's verification step over
[last token, N tree nodes] under the tree's mask over its one-token step, for N = 1 .. 64
(`--tree-nodes`), on each of our step paths (on CUDA the compiled path compiles each new
width in the untimed warm-up), printed as its own table.

`--out FILE` writes every row and the v(N) sweep as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from specdec.decoding import GenerationSettings, ReplayDrafter, Sampler, generate  # noqa: E402
from specdec.decoding.cache import (  # noqa: E402
    RaggedCache,
    restore_static_cache,
    static_setup,
    use_dynamic_cache,
    use_static_cache,
)
from specdec.decoding.compiled import compile_steps, step_widths  # noqa: E402
from specdec.decoding.drafters import on_target_vocab  # noqa: E402
from specdec.decoding.eagle3 import Eagle3Drafter, default_aux_ids  # noqa: E402
from specdec.decoding.verify_cost import NODES, verify_costs  # noqa: E402
from specdec.engines.transformers import hf_generate  # noqa: E402
from specdec.io import write_json  # noqa: E402
from specdec.job.leviathan import draft_length_shares, per_token_alpha, predicted_speedup  # noqa: E402
from specdec.metadata import cpu_description, nvidia_driver  # noqa: E402
from specdec.prepare.head_training import new_eagle3  # noqa: E402
from specdec.prepare.models import prepare_embedded, weight_bytes  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
COMPILE_CACHE = Path(__file__).resolve().parents[1] / "resources" / "compile-cache"  # the pipeline's
GAMMA = 4
TODAY_135M_TOK_S = 50.0  # docs/performance.md: the 135M model at 40-50 tokens/s on the H200 before issue 19
HEAD_DRAFT_VOCAB = 32000  # the public EAGLE-3 heads for Llama-3.1-8B (yuhuili/EAGLE3-LLaMA3.1-Instruct-8B)
HEAD_BATCHES = {"cuda": (1, 4, 16, 64), "cpu": (1, 4)}

class StepPath:
    """One of our engine's step paths, switched on for its models around each of its runs, so
    that the paths are measured interleaved in one process. `prepare(model, role,
    max_length)` sets a model up once (decoding.cache / decoding.compiled); later runs
    restore that setup, its caches and compiled graphs as they were."""

    def __init__(self, prepare=None):
        self.prepare, self.setups = prepare, {}

    @contextmanager
    def on(self, models: dict[str, object], max_length: int):
        """`models`: role ("target", "drafter") -> model."""
        for role, model in models.items():
            if self.prepare is not None and id(model) not in self.setups:
                self.prepare(model, role, max_length)
                self.setups[id(model)] = static_setup(model)
            restore_static_cache(model, self.setups.get(id(model)))
        try:
            yield
        finally:
            for model in models.values():
                use_dynamic_cache(model)


def _compiled(model, role, max_length):
    record = compile_steps(model, max_length, 1, {role: step_widths(GAMMA, role)}, COMPILE_CACHE)
    print(f"  {role}: steps compiled in {record['compile_s']:.0f} s (apart from every timing)", flush=True)


# Our engine's step paths (decoding.cache, decoding.compiled): each "ours" row is measured
# on every path that runs on the device. The compiled one is CUDA only here: on the CPU,
# inductor takes minutes per shape (docs/performance.md).
ENGINE_VARIANTS = {
    "ours": lambda on_gpu: StepPath(),
    "ours static": lambda on_gpu: StepPath(lambda model, role, max_length: use_static_cache(model, max_length)),
    "ours compiled": lambda on_gpu: StepPath(_compiled) if on_gpu else None,
}


def model_config(name: str):
    """A transformers config from bench/configs/NAME.json (its `_source` line says where the
    values come from)."""
    fields = json.loads((CONFIGS / f"{name}.json").read_text())
    fields.pop("_source")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def shrink(config, layers: int, hidden: int, vocab: int = 8192):
    """The same architecture at a CPU-sized shape: `layers` layers of width `hidden`, heads
    of 64, the grouped-query ratio kept where it divides."""
    small = copy.deepcopy(config)
    heads = max(hidden // 64, 1)
    groups = config.num_attention_heads // config.num_key_value_heads
    small.update({"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": hidden * 3,
                  "num_attention_heads": heads, "num_key_value_heads": max(heads // groups, 1), "head_dim": 64,
                  "vocab_size": vocab, "max_window_layers": layers, "bos_token_id": None, "eos_token_id": None})
    return small


def random_model(config, device: str, dtype: torch.dtype):
    """A causal LM of `config` with random weights made on `device` (no host copy)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random weights have no end: every row decodes max_new_tokens, as in both engines' rows.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str, nbytes: int, repeats: int = 20) -> float:
    """Bytes per second a device-to-device copy reads and writes (2 x size / time)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - began)


def step_seconds(rows) -> float:
    """Mean time between a row's emissions (its decode steps; the prefill left out)."""
    steps = sum(len(row.emissions) - 1 for row in rows)
    return sum(row.emissions[-1][0] - row.emissions[0][0] for row in rows) / 1e9 / steps if steps else float("nan")


def tokens_per_s(runs) -> float:
    """Output tokens per second over timed runs [(rows, seconds)]."""
    return sum(len(r.output_ids) for rows, _ in runs for r in rows) / sum(s for _, s in runs)


def timed(run):
    began = time.perf_counter()
    rows = run()
    return rows, time.perf_counter() - began


def replay_assistant(model, reference: list[int], prompt_len: int, error_rate: float, seed: int):
    """`model` for transformers' assisted generation, its forwards run as they are, its logits
    then overwritten so that its greedy choice is the replay's: the reference token of each
    position, wrong with probability `error_rate` (the `ReplayDrafter`'s rule)."""
    twin = copy.copy(model)  # shares the weights; only `forward` differs
    forward = model.forward
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.vocab_size
    # the reference, then 0 for any position past it; on the device, so no step syncs for it
    table = torch.tensor([*reference, 0], device=device)

    def replaying(*args, **kwargs):
        out = forward(*args, **kwargs)
        kept = out.logits.shape[1]
        # Logits after the token at position i choose the token at i + 1: output index
        # i + 1 - prompt_len. generate() passes position ids (the assistant's cache length
        # does not follow its re-fed inputs).
        index = kwargs["position_ids"][0, -kept:] + 1 - prompt_len
        index = torch.where((index >= 0) & (index < len(reference)), index, len(reference))
        tokens = table[index]
        wrong = torch.rand(kept, generator=generator, device=device) < error_rate
        shift = torch.randint(1, vocab, (kept,), generator=generator, device=device)
        tokens = torch.where(wrong, (tokens + shift) % vocab, tokens)
        forced = torch.full_like(out.logits, -1e4)
        forced[0, torch.arange(kept, device=device), tokens] = 0
        out.logits = forced
        return out

    twin.forward = replaying
    return twin


def cached_step_s(step, width: int, device: torch.device, repeats: int) -> float:
    """Seconds per `step()` that appends `width` slots to a cache, each time dropped again
    (so every repeat sees the same context); the first, a warm-up, untimed."""
    def once():
        cache = step()
        cache.rollback(torch.zeros(cache.lengths.shape[0], dtype=torch.long, device=device), width, 0)

    once()
    sync(str(device))
    began = time.perf_counter()
    for _ in range(repeats):
        once()
    sync(str(device))
    return (time.perf_counter() - began) / repeats


def target_step(cache: RaggedCache, tokens: torch.Tensor):
    """A target forward of `tokens` (B, w) after the cached prompt, every position's logits
    kept (as a verification keeps them), as `cached_step_s` times it."""
    valid = torch.ones_like(tokens, dtype=torch.bool)

    def step():
        cache.extend(tokens, valid)
        return cache

    return step


def decode_forward_ratio(model, input_ids: torch.Tensor, width: int, repeats: int) -> float:
    """v: a `width`-token target forward over a cached prompt / a one-token forward."""
    with torch.inference_mode():
        cache, _ = RaggedCache.prefill(model, input_ids, torch.ones_like(input_ids))
        return (cached_step_s(target_step(cache, input_ids[:, -width:]), width, input_ids.device, repeats)
                / cached_step_s(target_step(cache, input_ids[:, -1:]), 1, input_ids.device, repeats))


def head_aux_ids(layers: int) -> tuple[int, ...]:
    """vLLM's default auxiliary layers (2, L//2, L-3), or, for a target too shallow for three
    distinct ones (the CPU's shrunken shapes), its last three states."""
    ids = default_aux_ids(layers)
    return ids if len(set(ids)) == 3 and min(ids) >= 0 else tuple(range(max(layers - 2, 0), layers + 1))


def random_eagle3(target) -> Eagle3Drafter:
    """An EAGLE-3 head of the public heads' shape for `target`, random weights: one layer
    shaped as the target's, the target's embedding shared, a draft vocabulary of
    HEAD_DRAFT_VOCAB ids (a quarter of a shrunken vocabulary), `head_aux_ids`."""
    text = target.config.get_text_config()
    device = target.get_input_embeddings().weight.device
    torch.manual_seed(0)
    draft_ids = torch.arange(min(HEAD_DRAFT_VOCAB, text.vocab_size // 4), device=device)
    drafter = new_eagle3(target, draft_ids, head_aux_ids(text.num_hidden_layers))
    drafter.head.eval()
    return drafter


def head_steps(drafter: Eagle3Drafter, target, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per step at the prompt's batch size, each after the cached prompt: the
    target's decode step without hidden states and with the head's (`target`,
    `target_hidden`), and the head's draft step (`head`): one token through the head on its
    own cache, fed the state it made for the token before (as every draft after a
    proposal's first is), and its greedy pick on the target's vocabulary."""
    device, head = prompt.device, drafter.head
    mask = torch.ones_like(prompt)
    token = prompt[:, -1:]
    vocab, target_ids, greedy = target.config.get_text_config().vocab_size, head.target_ids(), Sampler(0, 0, 1.0, None)
    with torch.inference_mode():
        plain, _ = RaggedCache.prefill(target, prompt, mask)
        cache, _ = RaggedCache.prefill(target, prompt, mask, hidden_ids=drafter.hidden_ids)
        head_cache = RaggedCache(head, prompt.shape[0], device)
        head_cache.feed(partial(head, hidden=head.fc(cache.hidden)), prompt, mask.bool(), 1)
        state = head_cache.hidden[:, -1:]

        def head_step():
            logits = head_cache.feed(partial(head, hidden=state), token, torch.ones_like(token, dtype=torch.bool), 1)
            greedy.pick(on_target_vocab(logits[:, -1], target_ids, vocab))
            return head_cache

        return {"target": cached_step_s(target_step(plain, token), 1, device, repeats),
                "target_hidden": cached_step_s(target_step(cache, token), 1, device, repeats),
                "head": cached_step_s(head_step, 1, device, repeats)}


def eagle3_rows(table, target, prompt_len: int, new_tokens: int, batches: tuple[int, ...], repeats: int, rounds: int) -> dict:
    """The EAGLE-3 head's rows (module docstring) on `target`; returns what they show:
    `steps` (batch -> `head_steps`), `c` (batch -> head step / target step with hidden
    states), `hidden_cost` (batch -> target step with / without hidden states), the
    speculative decode's `identical` (to AR) and `spec_over_ar` (its tokens/s over AR's)."""
    device = target.get_input_embeddings().weight.device
    drafter = random_eagle3(target)
    head_params = sum(p.numel() for n, p in drafter.head.named_parameters() if not n.startswith("embed_tokens."))
    vocab = target.config.get_text_config().vocab_size
    steps = {}
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
        steps[batch] = head_steps(drafter, target, prompt, repeats)
    c = {b: s["head"] / s["target_hidden"] for b, s in steps.items()}
    hidden_cost = {b: s["target_hidden"] / s["target"] for b, s in steps.items()}
    for batch, step in steps.items():
        table.add(f"EAGLE-3 head step / target step (c), batch {batch}", f"{step['head'] * 1e3:.3f} ms ({head_params / 1e6:.0f} M parameters)",
                  f"{step['target_hidden'] * 1e3:.3f} ms", c[batch], "-")
        table.add(f"target step with the head's hidden states {drafter.hidden_ids} / without, batch {batch}",
                  f"{step['target_hidden'] * 1e3:.3f} ms", f"{step['target'] * 1e3:.3f} ms", hidden_cost[batch], "~1.0x")

    prompt = torch.randint(0, vocab, (1, prompt_len), device=device)
    settings = GenerationSettings(max_new_tokens=new_tokens, gamma=GAMMA)
    ar_runs, spec_runs = [], []
    for _ in range(rounds + 1):  # the first round warms up, untimed
        ar_runs.append(timed(lambda: generate(target, prompt, torch.ones_like(prompt), settings)))
        spec_runs.append(timed(lambda: generate(target, prompt, torch.ones_like(prompt), settings, drafter)))
    identical = ar_runs[0][0][0].output_ids == spec_runs[0][0][0].output_ids
    spec = [r for rows, _ in spec_runs[1:] for r in rows]
    spec_over_ar = tokens_per_s(spec_runs[1:]) / tokens_per_s(ar_runs[1:])
    table.add(f"ours spec EAGLE-3 head (random weights, gamma {GAMMA}) / ours AR, batch 1",
              f"{tokens_per_s(spec_runs[1:]):.1f} tok/s (accepted {sum(r.accepted_tokens for r in spec)} of {sum(r.drafted_tokens for r in spec)}, "
              f"{'identical to' if identical else 'DIFFERS from'} AR)", f"{tokens_per_s(ar_runs[1:]):.1f} tok/s", spec_over_ar,
              "outputs = AR")
    return {"steps": steps, "c": c, "hidden_cost": hidden_cost, "identical": identical, "spec_over_ar": spec_over_ar}


def tree_rows(table, target, prompt: torch.Tensor, paths: dict, max_length: int, nodes: tuple[int, ...], repeats: int) -> dict:
    """v(N) on each of our step paths (`verify_costs`), one row per path and a table of its
    own; returns path name -> `verify_costs`."""
    sweep = {}
    for name, path in paths.items():
        began = time.perf_counter()
        with path.on({"target": target}, max_length):
            sweep[name] = costs = verify_costs(target, prompt, torch.ones_like(prompt), nodes, repeats)
        table.add(f"{name} tree verify step v(N) / AR step, N = {', '.join(map(str, nodes))}",
                  " ".join(f"{cost['v']:.2f}" for cost in costs["nodes"].values()),
                  f"AR step {costs['ar_s'] * 1e3:.3f} ms (sweep {time.perf_counter() - began:.0f} s, warm-ups included)", None, "-")
    print(f"\nv(N): median of {repeats} steps, batch {prompt.shape[0]}, after a {prompt.shape[1]}-token prompt")
    print(f"{'path':<16}{'N nodes':>8}{'tree ms':>10}{'v(N)':>7}{'causal ms':>11}{'tree/causal':>13}")
    for name, costs in sweep.items():
        for n, cost in costs["nodes"].items():
            print(f"{name:<16}{n:>8}{cost['tree_s'] * 1e3:>10.3f}{cost['v']:>7.2f}{cost['causal_s'] * 1e3:>11.3f}"
                  f"{cost['tree_over_causal']:>13.2f}")
    return sweep


class Table:
    def __init__(self):
        self.rows = []

    def add(self, name: str, measured: str, against: str, ratio: float | None, goal: str) -> None:
        self.rows.append((name, measured, against, "-" if ratio is None else f"{ratio:.2f}x", goal))
        print(f"  measured: {name}: {measured} / {against}", flush=True)

    def as_json(self) -> list[dict]:
        return [dict(zip(("row", "measured", "against", "ratio", "goal"), row)) for row in self.rows]

    def print(self) -> None:
        widths = [max(len(str(r[i])) for r in [("row", "measured", "against", "ratio", "goal"), *self.rows]) for i in range(5)]
        for row in [("row", "measured", "against", "ratio", "goal"), *self.rows]:
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="llama-3.1-8b", help="a config under bench/configs/")
    parser.add_argument("--drafter", default="llama-3.2-1b", help="a config under bench/configs/ (same vocabulary)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="the CPU part at its smallest: 1 round, 8 new tokens")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per comparison (default: 3 on CUDA, 1 on the CPU)")
    parser.add_argument("--tree-nodes", type=int, nargs="+", default=list(NODES), help="the N of the v(N) sweep")
    parser.add_argument("--out", type=Path, help="write the rows and the v(N) sweep to this JSON file")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    rounds = args.rounds or (3 if on_gpu else 1)
    prompt_len, new_tokens = (128, 128) if on_gpu else (16, 8 if args.smoke else 24)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    began = time.perf_counter()

    target_config, drafter_config = model_config(args.target), model_config(args.drafter)
    if not on_gpu:
        target_config = shrink(target_config, layers=2, hidden=256)
        drafter_config = shrink(drafter_config, layers=1, hidden=128)
    torch.manual_seed(0)
    target = random_model(target_config, args.device, dtype)
    drafter_model = random_model(drafter_config, args.device, dtype)
    device_name = torch.cuda.get_device_name(args.device) if on_gpu else cpu_description()
    print(f"{args.target} target ({'scaled down: ' if not on_gpu else ''}{sum(p.numel() for p in target.parameters()) / 1e9:.3f} B parameters) "
          f"with a {args.drafter} drafter, {dtype}, random weights; {prompt_len} prompt + {new_tokens} new tokens, "
          f"batch 1, gamma {GAMMA}, {rounds} round(s); device {args.device}: {device_name}"
          + (f", driver {nvidia_driver()}, CUDA {torch.version.cuda}" if on_gpu else "")
          + f"; torch {torch.__version__}", flush=True)

    table = Table()
    bandwidth = copy_bandwidth(args.device, (1 << 30) if on_gpu else (1 << 27))
    weights = weight_bytes(target)
    bound = weights / bandwidth
    table.add("device copy bandwidth", f"{bandwidth / 1e12:.3f} TB/s", f"bound {bound * 1e3:.3f} ms/token for {weights / 1e9:.2f} GB", None, "-")

    prompt = torch.randint(0, target_config.vocab_size, (1, prompt_len), device=args.device)
    mask = torch.ones_like(prompt)
    settings = GenerationSettings(max_new_tokens=new_tokens, gamma=GAMMA)

    paths = {name: path for name, make in ENGINE_VARIANTS.items() if (path := make(on_gpu)) is not None}
    max_length = prompt_len + max(new_tokens + GAMMA, max(args.tree_nodes)) + 1  # a decode, or the widest tree step

    def ours(variant, drafter=None, model=target):
        def run():
            with paths[variant].on({"target": model, "drafter": drafter_model}, max_length):
                return generate(model, prompt, mask, settings, drafter)
        return run

    def theirs(**kwargs):
        return lambda: hf_generate(target, prompt, mask, settings, **kwargs)

    # Warm-ups (CUDA kernels, allocator) and each side's greedy reference continuation.
    reference = {variant: ours(variant)()[0].output_ids for variant in paths}
    hf_reference = theirs()()[0].output_ids
    compile_s = None
    if on_gpu:
        compile_s = timed(theirs(cache_implementation="static"))[1]  # generate() compiles its forward on first use
    continuations = {variant: {tuple(prompt[0].tolist()): ids} for variant, ids in reference.items()}

    def replay(variant, error_rate, cost_s_per_token=0.0, model=None):
        return ReplayDrafter(continuations[variant], error_rate, cost_s_per_token, model=model, seed=1)

    runs: dict[str, list] = {}

    def measure(name, run):
        runs.setdefault(name, []).append(timed(run))

    for _ in range(rounds):
        for variant in paths:
            measure(f"{variant} AR", ours(variant))
        measure("HF generate", theirs())
        if on_gpu:
            measure("HF static+compile", theirs(cache_implementation="static"))
        for variant in paths:
            measure(f"{variant} spec replay 0.8", ours(variant, replay(variant, 0.2, model=drafter_model)))
        assistant = replay_assistant(drafter_model, hf_reference, prompt_len, 0.2, seed=1)
        measure("HF assisted replay 0.8", theirs(assistant_model=assistant))

    def rows_of(name):
        return [r for rows, _ in runs[name] for r in rows]

    for variant in paths:
        ar = tokens_per_s(runs[f"{variant} AR"])
        step = step_seconds(rows_of(f"{variant} AR"))
        table.add(f"{variant} AR step, batch 1", f"{step * 1e3:.3f} ms", f"bound {bound * 1e3:.3f} ms", step / bound, "<= 1.25x")
        hf = tokens_per_s(runs["HF generate"])
        table.add(f"{variant} AR / HF generate", f"{ar:.1f} tok/s", f"{hf:.1f} tok/s", ar / hf, ">= 1.1x")
        if on_gpu:
            compiled = tokens_per_s(runs["HF static+compile"])
            table.add(f"{variant} AR / HF static cache + compile", f"{ar:.1f} tok/s", f"{compiled:.1f} tok/s (compile {compile_s:.0f} s apart)",
                      ar / compiled, ">= 1.0x")
        else:
            table.add(f"{variant} AR / HF static cache + compile", "not run on the CPU", "torch.compile takes minutes here", None, ">= 1.0x")
        spec = rows_of(f"{variant} spec replay 0.8")
        assisted = rows_of("HF assisted replay 0.8")
        ours_tpot = sum(s for _, s in runs[f"{variant} spec replay 0.8"]) / sum(len(r.output_ids) for r in spec)
        hf_tpot = sum(s for _, s in runs["HF assisted replay 0.8"]) / sum(len(r.output_ids) for r in assisted)
        table.add(f"{variant} spec ({args.drafter} forwards, replay a=0.8) / HF assisted, same",
                  f"{ours_tpot * 1e3:.2f} ms/token (a={_alpha(spec):.2f})", f"{hf_tpot * 1e3:.2f} ms/token", hf_tpot / ours_tpot, ">= 1.15x")

    for variant in paths:
        _leviathan_rows(table, variant, target, prompt, ours, replay, rounds, step_seconds(rows_of(f"{variant} AR")))

    eagle3_rows(table, target, prompt_len, new_tokens, HEAD_BATCHES[torch.device(args.device).type], repeats=20 if on_gpu else 5,
                rounds=rounds)
    _embedded_row(table, args.device, new_tokens, rounds, paths)
    sweep = tree_rows(table, target, prompt, paths, max_length, tuple(args.tree_nodes), repeats=20 if on_gpu else 3)
    print(f"\none table, measured side by side in one process ({time.perf_counter() - began:.0f} s):")
    table.print()
    if args.out:
        write_json(args.out, {"device": device_name, "target": args.target, "drafter": args.drafter, "dtype": str(dtype),
                              "torch": torch.__version__, "rows": table.as_json(), "verify_cost": sweep})


def _alpha(rows) -> float:
    return per_token_alpha(_per_position(rows)) or float("nan")


def _per_position(rows):
    width = max(len(r.drafted_per_position) for r in rows)
    return [{"drafted": sum(r.drafted_per_position[i] for r in rows if i < len(r.drafted_per_position)),
             "accepted": sum(r.accepted_per_position[i] for r in rows if i < len(r.accepted_per_position))} for i in range(width)]


def _leviathan_rows(table, variant, target, prompt, ours, replay, rounds, ar_step):
    """Speedup of the host-paced replay (cost c = 0.1 of an AR step per draft token) over our
    AR, against Leviathan's prediction from the measured alpha, c, v and draft lengths."""
    c = 0.1
    v = decode_forward_ratio(target, prompt, GAMMA + 1, repeats=10)
    for alpha in (0.6, 0.8):
        ar_runs, spec_runs = [], []
        for _ in range(rounds):
            ar_runs.append(timed(ours(variant)))
            spec_runs.append(timed(ours(variant, replay(variant, 1 - alpha, cost_s_per_token=c * ar_step))))
        rows = [r for rows, _ in spec_runs for r in rows]
        positions = _per_position(rows)
        measured_alpha = per_token_alpha(positions)
        steps = sum(r.target_forwards - 1 for r in rows)  # the prefill verifies nothing
        predicted = predicted_speedup(measured_alpha, c, v, draft_length_shares(positions, steps))
        measured = tokens_per_s(spec_runs) / tokens_per_s(ar_runs)
        table.add(f"{variant} replay a={alpha} (c={c}, v={v:.2f}) speedup / Leviathan", f"{measured:.2f}x (a={measured_alpha:.2f})",
                  f"predicted {predicted:.2f}x", measured / predicted, ">= 0.9x")


def _embedded_row(table, device, new_tokens, rounds, paths):
    """The embedded 135M model, AR at batch 1 on each of our step paths, its own prompt of
    random ids."""
    on_gpu = torch.device(device).type == "cuda"
    model = AutoModelForCausalLM.from_pretrained(prepare_embedded(), dtype=torch.bfloat16 if on_gpu else torch.float32).to(device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
    settings = GenerationSettings(max_new_tokens=new_tokens)

    def run(path):
        with path.on({"target": model}, prompt.shape[1] + new_tokens + 1):
            return generate(model, prompt, torch.ones_like(prompt), settings)

    for path in paths.values():
        run(path)  # warm-up (and the compiled path's compile)
    runs = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            runs[name].append(timed(lambda: run(path)))
    for name in paths:
        rate = tokens_per_s(runs[name])
        table.add(f"135M embedded AR, batch 1 ({name})", f"{rate:.1f} tok/s", f"{TODAY_135M_TOK_S:.0f} tok/s before (H200)",
                  rate / TODAY_135M_TOK_S if on_gpu else None, ">= 2x (GPU only)")

if __name__ == "__main__":
    main()
