"""A tiny real run of the whole pipeline on the embedded model: prompts, three methods,
tables, figures, report; then a rerun that does nothing."""

import json
import os
import re

import pandas as pd
import pytest
from conftest import TINY_CONFIG, run_snakemake


@pytest.fixture(scope="module")
def first_run(make_study):
    """`.venv/bin/snakemake` as the README runs it, in a shell whose PATH lacks the venv (no
    activated environment): the rules must find `specdec` on their own."""
    workdir = make_study(TINY_CONFIG)
    run = run_snakemake(workdir, "--cores", "2", path=os.defpath)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir, run


@pytest.fixture(scope="module")
def study(first_run):
    return first_run[0]


def test_the_console_shows_each_cell_start_progress_and_end_not_its_log(first_run):
    workdir, run = first_run
    console = run.stdout + run.stderr
    for cell in (workdir / "results/runs/tiny").iterdir():
        cell_id = f"tiny/{cell.name}"
        assert f"{cell_id}: started" in console
        assert f"{cell_id}: 2/2 requests" in console  # the last progress line, with its ETA
        assert re.search(rf"{re.escape(cell_id)}: ok in \d+ s, [\d.]+ tok/s", console)
        log = (workdir / "logs/benchmark" / f"{cell_id}.log").read_text()
        assert "warm-up done; measuring 2 requests" in log and "tok/s" in log
    assert "warm-up done" not in console  # the full log stays in logs/


def test_summary_table_compares_every_method_with_ar(study):
    summary = pd.read_csv(study / "results/tables/tiny/summary.csv")
    assert sorted(summary["method"]) == ["ar", "ngram", "speculative"]
    assert (summary["throughput_tok_s"] > 0).all()
    ar = summary[summary["method"] == "ar"].iloc[0]
    assert ar["speedup"] == pytest.approx(1.0)
    spec = summary[summary["method"] != "ar"]
    assert (spec["speedup"] > 0).all() and (spec["acceptance_rate"].between(0, 1)).all()
    assert (spec["mean_accepted_length"] >= 1).all()
    assert (spec["predicted_speedup"] > 0).all()


def test_every_cell_of_a_setup_runs_the_kernels_chosen_once_for_it(study):
    # one choice per model, dtype and batch size (choose_kernels), read by each cell
    choices = sorted((study / "results/kernels").glob("*.json"))
    assert [p.name for p in choices] == ["smollm2--float32--b1.json"]
    choice = json.loads(choices[0].read_text())
    assert choice["rows"] == 1 and choice["layers"] > 0 and choice["library_s"] > 0
    for path in (study / "results/runs/tiny").glob("*/result.json"):
        kernels = json.loads(path.read_text())["engine"]["settings"]["kernels"]["target"]
        assert kernels["source"].endswith("kernels/smollm2--float32--b1.json")
        assert kernels["weight_major"] == choice["weight_major"]
        assert (kernels["layers_weight_major"] > 0) == choice["weight_major"]

def test_every_cell_records_its_step_path(study):
    """CPU cells without `compile:` decode on the growing cache, and say so per role."""
    for path in (study / "results/runs/tiny").glob("*/result.json"):
        result = json.loads(path.read_text())
        roles = ["target", "drafter"] if result["config"]["method"] == "speculative" else ["target"]
        assert result["engine"]["settings"]["compile"] == {role: {"enabled": False, "static_cache": False} for role in roles}


def test_greedy_speculative_outputs_equal_ar(study):
    runs = sorted((study / "results/runs/tiny").glob("*/result.json"))
    assert len(runs) == 3
    for path in runs:
        result = json.loads(path.read_text())
        assert result["status"] == "ok"
        assert result["energy"] == {"available": False, "reason": result["energy"]["reason"]}
        if result["config"]["method"] != "ar":
            assert result["correctness"]["checked"] and result["correctness"]["identical"], result["correctness"]
            assert result["correctness"]["requests_compared"] == 2


def test_results_record_memory_against_the_models(study):
    memory = {path.parent.name.split("--")[1]: json.loads(path.read_text())["memory"]
              for path in (study / "results/runs/tiny").glob("*/result.json")}
    target_mb = memory["specdec-ar"]["weights_mb"]
    assert 500 < target_mb < 530  # SmolLM2-135M in fp32
    assert memory["specdec-ngram-ngram-g3"]["weights_mb"] == target_mb  # a model-free drafter adds none
    int8 = memory["specdec-speculative-int8-g3"]
    assert target_mb + 125 < int8["weights_mb"] < target_mb + 135  # int8 linears; embeddings shared
    for m in memory.values():
        assert m["device"] == "cpu" and m["kv_cache_mb"] > 0
        assert m["peak_mb"] > m["baseline_rss_mb"] + m["weights_mb"] * 0.9
        assert m["peak_over_needed"] > m["growth_over_needed"] > 0.9


def test_attribution_covers_the_measured_window_only(study):
    from specdec.records import read_requests

    for folder in (study / "results/runs/tiny").iterdir():
        block = json.loads((folder / "result.json").read_text())["attribution"]
        measured = [r for r in read_requests(folder / "requests.jsonl") if not r["warmup"]]
        assert block["decode_calls"] == len(measured)  # batch 1: one decode per request, the warm-up's not among them
        assert sum(v for v in block["parts_s"].values() if v is not None) == pytest.approx(block["decode_s"])
        forwards = block["forwards"]
        decode_rows = sum(b["rows"] for b in forwards["target_decode"].values())
        assert forwards["target_prefill"]["rows"] + decode_rows == sum(r["target_forwards"] for r in measured)
        assert (block["parts_s"]["drafter"] is None) == ("ngram" in folder.name)


def test_figures_and_report(study):
    assert (study / "results/figures/tiny/speedup_vs_gamma/speedup_vs_gamma.png").stat().st_size > 1000
    report = run_snakemake(study, "--cores", "2", "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    text = (study / "report.html").read_text()
    assert "speedup_vs_gamma" in text and "sample.skipped.html" in text
    assert (study / "results/prompts/sample.skipped.csv").read_text() == "file,line,reason\n"


def test_second_run_does_nothing(study):
    again = run_snakemake(study, "--cores", "2", "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_deleted_cell_is_rebuilt_and_the_tables_follow(study):
    """No table outlives its inputs: the tables depend on every cell's result."""
    import shutil

    cell = next((study / "results/runs/tiny").glob("*--specdec-ngram-*"))
    summary = study / "results/tables/tiny/summary.csv"
    before = summary.stat().st_mtime_ns
    shutil.rmtree(cell)
    plan = run_snakemake(study, "--cores", "2", "-n")
    assert "Nothing to be done" not in plan.stdout + plan.stderr
    rerun = run_snakemake(study, "--cores", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (cell / "result.json").is_file() and (cell / "cell.json").is_file()
    assert summary.stat().st_mtime_ns > before
