"""The power sampler's cost on decode throughput: monitor on vs off, interleaved.

    python bench/power_overhead.py [--pairs 6] [--tokens 32] [--interval-ms 100]

Greedy decode with the embedded SmolLM2-135M (on cuda when there is one), alternating runs
with the sampler thread on and off (ABBA order, so drift cancels), and prints median tokens/s
side by side with their ratio. It also times one `sample()` directly: that cost divided by
the interval is the sampler's share of one core. Without NVML it samples the tests' fake NVML
(tests/test_power.py), which measures the thread's Python cost but not NVML's driver calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from specdec.gate.cells import Power  # noqa: E402
from specdec.job.power import PowerMonitor, SourceUnavailable  # noqa: E402
from specdec.prepare.models import prepare_embedded  # noqa: E402

MODEL_DIR = prepare_embedded()
PROMPT = "Write a Python function that checks whether a number is prime."


def monitor_factory(config):
    """A callable making a fresh monitor, and a line saying what it samples."""
    try:
        PowerMonitor.for_gpus(config).close()
        return (lambda: PowerMonitor.for_gpus(config)), "real NVML"
    except SourceUnavailable as exc:
        sys.path.insert(0, str(REPO / "tests"))
        from test_power import FakeGpu, FakeNVML

        def make():
            nvml = FakeNVML(time.perf_counter, [FakeGpu("GPU-fake", [(0.0, 100.0)])])
            return PowerMonitor.for_gpus(config, nvml=nvml, environ={})

        return make, f"the tests' fake NVML ({exc})"


def sample_cost_s(make_monitor, calls: int = 2000) -> float:
    monitor = make_monitor()
    start = time.perf_counter()
    for _ in range(calls):
        monitor.sample()
    cost = (time.perf_counter() - start) / calls
    monitor.close()
    return cost


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).to(device).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(device)
    config = Power(interval_ms=args.interval_ms, idle_s=0)
    make_monitor, what = monitor_factory(config)

    def decode_tok_s() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        return (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - start)

    def run(monitored: bool) -> float:
        if not monitored:
            return decode_tok_s()
        with make_monitor() as monitor:
            tok_s = decode_tok_s()
            samples = len(monitor._ticks)
        samples_seen.append(samples)
        return tok_s

    samples_seen: list[int] = []
    decode_tok_s()  # warm-up
    results = {True: [], False: []}
    for pair in range(args.pairs):
        for monitored in ((True, False) if pair % 2 == 0 else (False, True)):
            results[monitored].append(run(monitored))
    on, off = statistics.median(results[True]), statistics.median(results[False])
    cost = sample_cost_s(make_monitor)
    print(f"decode: SmolLM2-135M fp32 on {device}, batch 1, {args.tokens} tokens, {args.pairs} interleaved pairs")
    print(f"sampler: every {args.interval_ms:g} ms over {what}; "
          f"{statistics.median(samples_seen)} samples per monitored run (median)")
    print(f"{'monitor':10}{'median tok/s':>14}{'runs':>40}")
    for label, key in (("off", False), ("on", True)):
        runs = " ".join(f"{x:.1f}" for x in results[key])
        print(f"{label:10}{statistics.median(results[key]):>14.2f}   {runs:>37}")
    print(f"on / off throughput ratio: {on / off:.4f} ({(1 - on / off) * 100:+.2f} % overhead)")
    print(f"one sample(): {cost * 1e6:.1f} us -> {cost / (args.interval_ms / 1000) * 100:.3f} % of one core")


if __name__ == "__main__":
    main()
