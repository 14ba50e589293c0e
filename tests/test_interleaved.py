"""The interleaved AR reference (`reference: interleaved`): what the gate accepts and refuses,
the batch-by-batch alternation, a job on the embedded model that records both sides, and the
summary pairing each request with its own interleaved AR measurement."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cell_inputs

from specdec.job import runner
from specdec.report.aggregate import aggregate_experiment, read_runs, runs_table
from specdec.gate.cells import Load
from specdec.gate.config import ConfigError, expand_matrix, reference_cell, validate
from specdec.job.load import BatchServer, RequestStream, run_load
from specdec.job.metrics import summarize
from specdec.records import INTERLEAVED_REQUESTS, read_requests, read_result, result_from_dict, write_requests, write_result

FIXTURES = Path(__file__).parent / "fixtures" / "results" / "runs" / "demo"
NGRAM = "humaneval--specdec-ngram-ngram-g4--b1-n16-t0-cpu"


def config(dtype: str = "int8", **experiment) -> dict:
    return {
        "seed": 5,
        "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"copy": {"kind": "quantized", "dtype": dtype}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
        "experiments": {"il": {"target": "smollm2", "datasets": ["sample"], "max_new_tokens": 8, "warmup": 1,
                               "methods": [{"method": "ar"}, {"method": "speculative", "drafter": "copy", "gamma": 3}]}
                        | experiment},
        "power": {"idle_s": 0},
    }


def references(cfg: dict) -> dict[str, str]:
    return {f"{c.method}/{c.placement.strategy}/{c.load.mode}": c.reference for c in expand_matrix(validate(cfg))}


# ---------------------------------------------------------------------------- the gate


def test_the_default_follows_the_placement_and_the_load():
    loads = [{"mode": "closed"}, {"mode": "open", "rate": 1.0, "num_requests": 2}]
    cfg = config("bf16", load=loads, placement=["cpu", "same"])  # int8 runs on the CPU only
    assert references(cfg) == {
        "speculative/cpu/closed": "interleaved",  # measured: docs/methodology.md, "Interleaved AR reference"
        "speculative/cpu/open": "separate",  # interleaving would delay the arrivals
        "speculative/same/closed": "separate",  # GPUs: unmeasured, the cheaper default
        "speculative/same/open": "separate",
        "ar/cpu/closed": "separate", "ar/cpu/open": "separate", "ar/same/closed": "separate", "ar/same/open": "separate",
    }


def test_given_references_are_taken_and_a_method_overrides_the_experiment():
    cfg = config(reference="separate", batch_size=2)
    assert references(cfg)["speculative/cpu/closed"] == "separate"
    cfg["experiments"]["il"]["methods"][1]["reference"] = "interleaved"
    (spec,) = [c for c in expand_matrix(validate(cfg)) if c.drafts]
    assert spec.interleaved and spec.batch_size == 2  # a static batch is served by both sides alike
    # its greedy outputs are checked against its own AR, so it waits for no AR cell
    assert reference_cell(spec, expand_matrix(validate(cfg))) is None


@pytest.mark.parametrize("change, key, message", [
    ({"load": {"mode": "open", "rate": 1.0, "num_requests": 2}}, "experiments.il.reference", "open load"),
    ({"engine": "vllm"}, "experiments.il.reference", "vLLM"),
])
def test_interleaving_is_refused_where_it_changes_what_is_measured(change, key, message):
    with pytest.raises(ConfigError, match=rf"config key '{key}': .*{message}"):
        validate(config(reference="interleaved", **change))


def test_the_refusal_names_the_method_key_and_ar_takes_no_reference():
    cfg = config(load={"mode": "open", "rate": 1.0, "num_requests": 2})
    cfg["experiments"]["il"]["methods"][1]["reference"] = "interleaved"
    with pytest.raises(ConfigError, match=r"config key 'experiments.il.methods.1.reference': .*open load"):
        validate(cfg)
    cfg = config()
    cfg["experiments"]["il"]["methods"][0]["reference"] = "separate"
    with pytest.raises(ConfigError, match=r"config key 'experiments.il.methods.0.reference': method 'ar' is the AR reference"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"config key 'experiments.il.reference'"):
        validate(config(reference="both"))


def test_two_cells_that_differ_only_in_their_reference_are_refused():
    cfg = config()
    cfg["experiments"]["il"]["methods"] += [{"method": "speculative", "drafter": "copy", "gamma": 3, "reference": "separate"}]
    with pytest.raises(ConfigError, match="two cells resolve to the same id"):
        expand_matrix(validate(cfg))


# ---------------------------------------------------------------------- the alternation


def test_each_batch_is_served_by_both_sides_alternating_which_goes_first():
    clock = iter(range(0, 10**9, 1000))
    calls = []

    def engine(side):
        def serve(batch):
            calls.append((side, [r.request_id for r in batch]))
            t = next(clock)
            return [{"emissions": [(t, 2)], "prompt_tokens": 3, "decode_start_ns": t} for _ in batch]
        return serve

    prompts = [{"id": f"p{i}", "turns": ["hi"]} for i in range(3)]
    now = clock.__next__
    served = run_load(RequestStream(prompts, warmup=1), BatchServer(engine("method"), 2, now, reference=engine("ar")), clock=now)
    records, ar = served.records, served.reference
    assert calls == [("method", ["warmup:p0#1"]), ("ar", ["warmup:p0#1"]),
                     ("ar", ["p0#1", "p1#1"]), ("method", ["p0#1", "p1#1"]),
                     ("method", ["p2#1"]), ("ar", ["p2#1"])]
    assert [r["request_id"] for r in ar] == ["warmup:p0#1", "p0#1", "p1#1", "p2#1"]
    assert [r["request_id"] for r in records] == [r["request_id"] for r in ar]
    with pytest.raises(ValueError, match="closed load"):
        run_load(RequestStream(prompts, Load(mode="open", rate=1.0, num_requests=2)),
                 BatchServer(engine("method"), 1, now, reference=engine("ar")))


def test_throughput_of_an_interleaved_side_divides_by_its_own_service_time():
    # two batches of two rows, 1 s and 2 s in service, with 5 s of the other side between them
    rows = [{"request_id": f"r{i}", "arrival_s": s, "start_s": s, "first_token_s": s + 0.5, "finish_s": f,
             "output_tokens": 10, "prompt_tokens": 1, "emissions": [[s + 0.5, 5], [f, 5]]}
            for i, (s, f) in enumerate([(0, 1), (0, 0.8), (6, 8), (6, 7)])]
    assert summarize(rows, window="service")["window_s"] == pytest.approx(3.0)
    assert summarize(rows, window="service")["throughput_tok_s"] == pytest.approx(40 / 3)
    assert summarize(rows)["window_s"] == pytest.approx(8.0) and summarize(rows)["window"] == "span"


# --------------------------------------------------------- the job on the embedded model


@pytest.fixture(scope="module")
def interleaved_run(tmp_path_factory, embedded_model_dir):
    work = tmp_path_factory.mktemp("interleaved")
    cfg = config(reference="interleaved")
    models_dir, prompts = cell_inputs(work, embedded_model_dir, cfg["datasets"]["sample"], seed=5)
    (cell,) = [c for c in expand_matrix(validate(cfg)) if c.drafts]
    out = work / "runs" / cell.name
    result = runner.run_cell(cell, prompts, out, models_dir=models_dir)
    return cell, out, result


def test_the_job_records_both_sides_and_checks_greedy_outputs_against_its_own_ar(interleaved_run):
    cell, out, result = interleaved_run
    assert result["status"] == "ok", result["failure"]
    ours = [r for r in read_requests(out / "requests.jsonl") if not r["warmup"]]
    theirs = [r for r in read_requests(out / INTERLEAVED_REQUESTS) if not r["warmup"]]
    assert [r["request_id"] for r in ours] == [r["request_id"] for r in theirs] and len(ours) == 2
    assert all(r["drafted_tokens"] == 0 and r["target_forwards"] == r["output_tokens"] for r in theirs)
    assert all(r["drafted_tokens"] > 0 for r in ours)
    block = result["reference"]
    # warm-up is step 0 (method first), then AR goes first on the first measured request only
    assert (block["kind"], block["requests_paired"], block["reference_first"]) == ("interleaved", 2, 1)
    assert block["metrics"]["output_tokens"] == sum(r["output_tokens"] for r in theirs)
    assert result["metrics"]["window"] == "service"
    assert result["metrics"]["window_s"] == pytest.approx(sum(r["finish_s"] - r["start_s"] for r in ours))
    assert result["correctness"]["checked"] and result["correctness"]["status"] == "passed"
    assert result["correctness"]["reference"] == f"{INTERLEAVED_REQUESTS} (interleaved AR)"
    assert result["correctness"]["requests_compared"] == 2
    # the cell's attribution timed its own decode calls and prefills, none of AR's
    attribution = result["attribution"]
    assert attribution["decode_calls"] == 2 and attribution["forwards"]["target_prefill"]["count"] == 2
    assert read_result(out / "result.json").config == cell


def test_the_summary_pairs_each_request_with_its_interleaved_ar(interleaved_run, tmp_path):
    cell, out, result = interleaved_run
    written = aggregate_experiment([out / "result.json"], tmp_path, cell.experiment, n_resamples=200)
    summary = pd.read_csv(written["summary"][0]).set_index("cell")
    row = summary.loc[cell.group]
    ours = [r for r in read_requests(out / "requests.jsonl") if not r["warmup"]]
    theirs = [r for r in read_requests(out / INTERLEAVED_REQUESTS) if not r["warmup"]]

    def rate(rows):
        return sum(r["output_tokens"] for r in rows) / sum(r["finish_s"] - r["arrival_s"] for r in rows)

    assert row["speedup"] == pytest.approx(rate(ours) / rate(theirs))
    assert row["speedup_ci_low"] <= row["speedup"] <= row["speedup_ci_high"]
    assert row["reference"] == "interleaved" and row["baseline"] == f"{cell.group} (interleaved AR)"
    assert cell.group + " (interleaved AR)" not in summary.index  # the reference is no row of its own


# ------------------------------------------------------------------- pairing on fixtures


def test_the_summary_pairs_a_fixture_by_hand(tmp_path):
    """The n-gram fixture run (4 requests of 16 tokens, 1.463636 s each) made interleaved: each
    request, then AR on it for 2, 3, 2.5 and 4 s, one after the other. Speedup = (64 /
    5.854544) / (64 / 11.5) = 1.96429, where the fixture's separate AR cell gives 1.1."""
    folder = tmp_path / "demo" / f"{NGRAM}--r0"
    shutil.copytree(FIXTURES / f"{NGRAM}--r0", folder)
    result = json.loads((folder / "result.json").read_text())
    records, ar, now = [], [], 0.0

    def at(record: dict, start: float, e2e: float | None = None) -> dict:
        """The record moved to start at `start` (closed loop: arrival too); AR's one emission."""
        if e2e is not None:
            return dict(record, arrival_s=start, start_s=start, first_token_s=start + e2e, finish_s=start + e2e,
                        emissions=[[start + e2e, 16]], drafted_tokens=0, accepted_tokens=0)
        shift = start - record["start_s"]
        return dict(record, arrival_s=start, start_s=start, first_token_s=record["first_token_s"] + shift,
                    finish_s=record["finish_s"] + shift, emissions=[[t + shift, n] for t, n in record["emissions"]])

    for record, e2e in zip(read_requests(folder / "requests.jsonl"), [1.0, 2.0, 3.0, 2.5, 4.0]):  # warm-up first
        records.append(at(record, now))
        ar.append(at(record, records[-1]["finish_s"], e2e))
        now = ar[-1]["finish_s"]
    write_requests(folder / "requests.jsonl", records)
    write_requests(folder / INTERLEAVED_REQUESTS, ar)
    result["config"]["reference"] = "interleaved"
    result["metrics"] = summarize(records, window="service")
    result["reference"] = {"kind": "interleaved", "requests": INTERLEAVED_REQUESTS, "metrics": summarize(ar, window="service"),
                           "requests_paired": 4, "reference_first": 2, "window": "both sides"}
    result["energy"] = {"available": True, "method": "nvml_counter", "gross_j": 12.8, "per_output_token_j": {"gross": 0.1, "net": None}}
    write_result(folder / "result.json", result_from_dict(result, "test"))
    paths = [folder / "result.json", FIXTURES / "humaneval--specdec-ar--b1-n16-t0-cpu--r0" / "result.json"]
    runs = runs_table(read_runs(paths)).set_index("cell_name")
    # the window's energy holds AR's work too: no J/token of the method's own
    assert pd.isna(runs.loc[NGRAM, "energy_j_per_token"]) and "interleaved" in runs.loc[NGRAM, "energy_reason"]
    written = aggregate_experiment(paths, tmp_path / "tables", "demo", n_resamples=500)
    summary = pd.read_csv(written["summary"][0]).set_index("cell")
    row = summary.loc[NGRAM]
    assert row["speedup"] == pytest.approx(11.5 / (4 * 1.463636)) == pytest.approx(1.96429, abs=1e-5)
    assert row["latency_speedup"] == pytest.approx(11.5 / (4 * 1.463636))
    assert row["speedup_ci_low"] < row["speedup"] < row["speedup_ci_high"]
    assert row["reference"] == "interleaved" and pd.isna(row["energy_ratio"])
    assert pd.isna(summary.loc["humaneval--specdec-ar--b1-n16-t0-cpu", "reference"])
    # per category: code is p0 and p1 (AR 2 + 3 s), writing p2 and p3 (AR 2.5 + 4 s)
    categories = pd.read_csv(written["categories"][0]).set_index(["cell", "category"])["speedup"]
    assert categories[(NGRAM, "code")] == pytest.approx(5.0 / (2 * 1.463636))
    assert categories[(NGRAM, "writing")] == pytest.approx(6.5 / (2 * 1.463636))
