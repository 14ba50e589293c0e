"""A tiny real run of the whole pipeline on the embedded model: prompts, three methods,
tables, figures, report; then a rerun that does nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "seed": 3,
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {"int8": {"kind": "quantized", "dtype": "int8"}, "ngram": {"kind": "ngram", "n": 3}},
    "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
    "experiments": {
        "tiny": {
            "target": "smollm2",
            "datasets": ["sample"],
            "methods": [
                {"method": "ar"},
                {"method": "speculative", "drafter": "int8", "gamma": 3},
                {"method": "ngram", "drafter": "ngram", "gamma": 3},
            ],
            "max_new_tokens": 8,
            "warmup": 1,
        }
    },
    "power": {"idle_s": 0},
    "aggregate": {"n_resamples": 200},
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory, embedded_model_dir):
    workdir = tmp_path_factory.mktemp("study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    # The embedded model converted once for the test session stands in for prepare_model.
    (workdir / "resources" / "models").mkdir(parents=True)
    (workdir / "resources" / "models" / "smollm2").symlink_to(embedded_model_dir)
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


def test_summary_table_compares_every_method_with_ar(study):
    summary = pd.read_csv(study / "results/tables/tiny/summary.csv")
    assert sorted(summary["method"]) == ["ar", "ngram", "speculative"]
    assert (summary["throughput_tok_s"] > 0).all()
    ar = summary[summary["method"] == "ar"].iloc[0]
    assert ar["speedup"] == pytest.approx(1.0)
    spec = summary[summary["method"] != "ar"]
    assert (spec["speedup"] > 0).all() and (spec["acceptance_rate"].between(0, 1)).all()
    assert (spec["mean_accepted_length"] >= 1).all()


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


def test_figures_and_report(study):
    assert (study / "results/figures/tiny/speedup_vs_gamma.png").stat().st_size > 1000
    report = snakemake(study, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "speedup_vs_gamma" in (study / "report.html").read_text()


def test_second_run_does_nothing(study):
    again = snakemake(study, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
