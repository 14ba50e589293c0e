"""A real SLURM round trip: Snakemake submits GPU jobs through the project's profile.

Runs only where `sinfo` exists and a cluster answers; CI starts one with .ci/slurm/start.sh
(one node, two fake GPUs declared as gres).
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONFIG, run_snakemake

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"


def _cluster_idle() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        # `scontrol ping` answers at once when no controller runs; sinfo retries for seconds.
        if subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode != 0:
            return False
        states = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (subprocess.TimeoutExpired, OSError):
        return False
    return any(state in ("idle", "mixed") for state in states)


pytestmark = pytest.mark.skipif(not _cluster_idle(), reason="no SLURM cluster answers (CI starts one)")

# `benchmark` runs on SLURM with 1 or 2 GPUs; `aggregate` is local, as in the real pipeline.
SNAKEFILE = textwrap.dedent(
    """
    localrules: all, aggregate

    rule all:
        input: "summary.txt"

    rule benchmark:
        output: "gpus{n}.txt"
        resources: gpu=lambda wc: int(wc.n), cpus_per_gpu=1, runtime=5, mem_mb=500
        shell: "echo job=$SLURM_JOB_ID cvd=$CUDA_VISIBLE_DEVICES > {output}"

    rule aggregate:
        input: expand("gpus{n}.txt", n=[1, 2])
        output: "summary.txt"
        shell: "cat {input} > {output}; echo local_job=${{SLURM_JOB_ID:-none}} >> {output}"
    """
)


def _fields(line: str) -> dict:
    return dict(part.split("=", 1) for part in line.split())


def test_snakemake_submits_gpu_jobs_through_the_profile(tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    # The project's profile, with a short first status check: a test job finishes in a second.
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["latency-wait"] = 5
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))

    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--workflow-profile", str(tmp_path / "profile"),
         "--directory", str(tmp_path), "--snakefile", str(tmp_path / "Snakefile")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    one, two = (_fields((tmp_path / f"gpus{n}.txt").read_text()) for n in (1, 2))
    assert one["job"] and two["job"] and one["job"] != two["job"]  # two distinct SLURM jobs
    assert len(one["cvd"].split(",")) == 1  # CUDA_VISIBLE_DEVICES set by SLURM's gres
    assert sorted(two["cvd"].split(",")) == ["0", "1"]
    assert (tmp_path / "summary.txt").read_text().splitlines()[-1] == "local_job=none"


def test_tiny_pipeline_runs_benchmarks_as_slurm_jobs(make_study):
    """The real pipeline through profiles/slurm: benchmark cells are SLURM jobs that SLURM
    gives CUDA_VISIBLE_DEVICES (each cell asks for one of the fake GPUs; placement stays on
    the CPU, since no CUDA exists here), while the other rules run locally."""
    config = dict(TINY_CONFIG, slurm={"cpus_per_gpu": 1, "cpus_per_task": 1, "mem_mb": 2000, "runtime": 10})
    workdir = make_study(config)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile.update({"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5, "jobs": 3})
    (workdir / "profile").mkdir()
    (workdir / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    run = run_snakemake(
        workdir, "--workflow-profile", str(workdir / "profile"), "--set-resources", "benchmark:gpu=1", timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = sorted((workdir / "results/runs/tiny").glob("*/result.json"))
    assert len(results) == 3
    jobs = set()
    for path in results:
        where = json.loads(path.read_text())["metadata"]["placement"]
        assert where["slurm_job_id"], path
        assert where["lease"]["source"] == "environment" and where["lease"]["cuda_visible_devices"] in ("0", "1")
        jobs.add(where["slurm_job_id"])
    assert len(jobs) == 3
    assert (workdir / "results/tables/tiny/summary.csv").is_file()
