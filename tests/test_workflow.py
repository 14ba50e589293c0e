"""The Snakemake workflow: lint, formatting, dry runs, and a tiny real end-to-end run."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import alias_bomb, run_snakemake

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPU8 = REPO / "tests" / "fixtures" / "configs" / "gpu8.yaml"


def snakemake(*args, cwd=REPO, check=True):
    proc = run_snakemake(cwd, *args)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_default_config(tmp_path):
    workdir = study_dir(tmp_path, REPO / "config.yaml")  # results of a real run in the repo would hide jobs
    out = snakemake("-n", "--cores", "2", "--quiet", "rules", cwd=workdir).stdout
    for rule in ("prepare_model", "prepare_dataset", "train_drafter", "benchmark", "aggregate", "plot", "heads_report"):
        assert rule in out


def study_dir(tmp_path: Path, config: Path) -> Path:
    """A working directory of its own: `config.yaml` there replaces the default one."""
    shutil.copy(config, tmp_path / "config.yaml")
    return tmp_path


def gpu8_dir(tmp_path: Path) -> Path:
    """A study of the 8-GPU example, with the MT-bench file it names (the gate checks it is there)."""
    workdir = study_dir(tmp_path, GPU8)
    (workdir / "data").mkdir()
    (workdir / "data" / "question.jsonl").write_text('{"question_id": 1, "category": "c", "turns": ["Hi?"]}\n')
    return workdir


def test_dry_run_gpu8_config_never_oversubscribes(tmp_path):
    workdir = gpu8_dir(tmp_path)
    out = snakemake("-n", "--cores", "64", "--resources", "gpu=8", cwd=workdir).stdout
    assert out.count("rule benchmark:") == 2 * 10 * 2 * 3 + 2 * 3 * 2 * 2 * 3 + 2
    resources = [line for line in out.splitlines() if line.strip().startswith("resources:")]
    gpus = [int(line.split(" gpu=")[1].split(",")[0]) for line in resources if " gpu=" in line]
    # same/auto: 1 (auto with gpus: 2 -> 2), separate: 2 with a drafter, multi_gpu_ratio 3+1
    assert set(gpus) == {1, 2, 3, 4} and max(gpus) <= 8
    # a cell that starts a vLLM server holds the GPUs its tensor parallel size names
    jobs = [job.split("\n\n")[0] for job in out.split("rule benchmark:")[1:]]
    served = [job for job in jobs if "--openai-" in job]
    assert len(served) == 2 and all(re.search(r"\bgpu=4\b", job) for job in served)


@pytest.mark.parametrize("edit, key", [
    (lambda text: text.replace("target: smollm2", "target: nope"), "config key 'experiments.default.target'"),
    # Snakemake's own validate counts 1.0 as an integer; the gate, which the Snakefile runs, does not.
    (lambda text: text.replace("batch_size: 1\n", "batch_size: 1.0\n", 1), "config key 'experiments.default.batch_size'"),
    (lambda text: text + "vllm: {venv: /any/path}\n", "'vllm': removed: a config does not name a program to run"),
])
def test_bad_config_fails_naming_the_key(tmp_path, edit, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(edit((REPO / "config.yaml").read_text()))  # the first experiment's
    proc = snakemake("-n", "--cores", "1", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr


@pytest.mark.parametrize("edit, where", [
    (lambda text: text.replace("seed: 1234", "seed: [1234"), r"config.yaml:\d+:\d+: "),  # a syntax mistake
    (lambda text: text + "seed: 7\n", r"config.yaml:\d+:1: key 'seed' appears twice \(first on line \d+\)"),
])
def test_a_yaml_mistake_in_config_yaml_names_its_line(tmp_path, edit, where):
    (tmp_path / "config.yaml").write_text(edit((REPO / "config.yaml").read_text()))
    proc = snakemake("-n", "--cores", "1", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert re.search(where, proc.stdout + proc.stderr), proc.stdout + proc.stderr


def test_vllm_cells_run_in_the_environment_the_shell_names(monkeypatch, tmp_path):
    venv = tmp_path / "my vllm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "specdec").write_text("")
    monkeypatch.setenv("SPECDEC_VLLM_VENV", str(venv))
    workdir = study_dir(tmp_path, REPO / "config.yaml")
    out = snakemake("-n", "--cores", "2", "--printshellcmds", "--config", "run=[engines]", cwd=workdir).stdout
    commands = [line.removeprefix("Shell command: ") for line in out.splitlines() if " run --cell " in line]
    vllm = [c for c in commands if "--vllm-" in c]
    assert vllm and all(c.startswith(f"'{venv}/bin/specdec' run ") for c in vllm)
    assert len(commands) > len(vllm) and not [c for c in commands if c not in vllm and str(venv) in c]


@pytest.mark.parametrize("bomb, args", [("config.yaml", []), ("bomb.yaml", ["--configfile", "bomb.yaml"])])
def test_a_yaml_alias_bomb_is_refused_before_snakemake_expands_it(tmp_path, bomb, args):
    """Refused by the Snakefile's first step, before `configfile:` or validate walk the data
    (which never finished). A bomb of nested mappings given with --configfile is beyond
    reach: Snakemake's command line merges it before the Snakefile runs (README)."""
    text = (REPO / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text)
    (tmp_path / bomb).write_text(text + alias_bomb())
    proc = run_snakemake(tmp_path, "-n", "--cores", "1", *args, timeout=120)
    assert proc.returncode != 0
    assert f"{bomb}: its aliases (*name) expand it to more than 100,000 values" in proc.stdout + proc.stderr


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only for this user: its mode for a user, its immutable flag for root
    (whom modes do not stop)."""
    folder.chmod(0o555)
    flag = ["chattr", "+i", str(folder)] if os.geteuid() == 0 else None
    if flag:
        subprocess.run(flag, check=True)
    try:
        yield
    finally:
        if flag:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_results_folder_that_cannot_be_written_stops_the_run_before_any_job(tmp_path):
    workdir = study_dir(tmp_path, REPO / "config.yaml")
    (workdir / "results").mkdir()
    with read_only(workdir / "results"):
        proc = snakemake("--cores", "1", "results/runs/default/humaneval--specdec-ar--b1-n32-t0-cpu--r0/cell.json",
                         cwd=workdir, check=False)
    assert proc.returncode != 0
    assert f"results folder {workdir / 'results'} cannot be written (results_dir: results)" in proc.stderr
    assert "rule cell:" not in proc.stderr


def test_slurm_profile_resolves_sbatch_resources_for_gpu8(tmp_path):
    workdir = gpu8_dir(tmp_path)
    out = snakemake("-n", "--workflow-profile", str(REPO / "profiles" / "slurm"), cwd=workdir).stdout
    resources = [line for line in out.splitlines() if line.strip().startswith("resources:") and " gpu=" in line]
    assert len(resources) == 2 * 10 * 2 * 3 + 2 * 3 * 2 * 2 * 3 + 2  # the served cells' too
    for line in resources:
        fields = dict(part.split("=", 1) for part in line.split(":", 1)[1].replace(" ", "").split(","))
        assert fields["gpu_model"] == "h100" and fields["cpus_per_gpu"] == "8"
        assert fields["mem_mb"] == "64000" and fields["runtime"] == "120"
        assert 1 <= int(fields["gpu"]) <= 4


def test_shell_metacharacters_in_config_strings_run_nothing(make_study, tmp_path, embedded_model_dir):
    """Every config string that reaches a shell command is quoted there: a dataset file and a
    model folder named like command substitutions are read as paths, and nothing runs.
    (Names cannot carry metacharacters at all: the gate refuses them, see test_config.)"""
    import json

    model = tmp_path / "m $(touch PWNED4); touch PWNED5"
    model.symlink_to(embedded_model_dir)
    questions = tmp_path / "q $(touch PWNED) `touch PWNED2`; touch PWNED3 'x\".jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    workdir = make_study({
        "models": {"smollm2": {"source": "local", "path": str(model)}},
        "datasets": {"mt": {"source": "mtbench", "path": str(questions)}},
        "experiments": {"sec": {"target": "smollm2", "datasets": ["mt"], "methods": [{"method": "ar"}],
                                "max_new_tokens": 2}},
    })
    run = snakemake("--cores", "1", "results/prompts/mt.jsonl", cwd=workdir, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (workdir / "results/prompts/mt.jsonl").is_file()
    assert not [p for p in (workdir, tmp_path, Path.cwd()) for name in ("PWNED", "PWNED2", "PWNED3", "PWNED4", "PWNED5") if (p / name).exists()]


def test_a_replay_cell_gets_its_ar_cells_requests_even_with_the_check_off(tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["correctness"] = {"check_greedy": False}
    config["drafters"]["replay80"] = {"kind": "replay", "error_rate": 0.2}
    config["experiments"]["default"]["methods"].append({"method": "speculative", "drafter": "replay80", "gamma": 4})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake("-n", "--cores", "2", "--printshellcmds", cwd=tmp_path).stdout
    commands = [line for line in out.splitlines() if "specdec run --cell" in line]
    replay = [c for c in commands if "-replay80-" in c]
    assert len(replay) == 2  # one per dataset
    for command in replay:
        cell = re.search(r"runs/default/(\S+?)/cell\.json", command).group(1)
        assert "--reference" in command and f"{cell.replace('-speculative-replay80-g4-', '-ar-')}/requests.jsonl" in command
    assert not [c for c in commands if "--reference" in c and "-replay80-" not in c]


# --- no stale results: what changes a cell's outcome reruns exactly that cell -----------------


def settle(workdir: Path) -> None:
    """Bring a study to "all built" without running a model: every file the cells and what
    they need would write is created, then `--touch` marks them built, in order, and records
    each job's params and inputs as a real run does. A dry run then plans nothing until
    something changes."""
    rows = [line.split("\t") for line in snakemake("--summary", cwd=workdir).stdout.splitlines()[1:]]
    built = [row[0] for row in rows if row[2] in ("cell", "prepare_dataset", "choose_kernels", "benchmark")]
    for path in built:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text("{}\n")  # a result must be readable JSON
    snakemake("--touch", "--forceall", "--cores", "1", *[path for path in built if path.endswith("result.json")], cwd=workdir)
    assert planned(workdir) == {}


def planned(workdir: Path) -> dict[str, set[str]]:
    """Rule -> the first output of each of its jobs that a dry run of the default target plans
    (the tables and figures, never built in these tests, left out)."""
    out = snakemake("-n", "--cores", "1", cwd=workdir).stdout
    jobs: dict[str, set[str]] = {}
    for rule, output in re.findall(r"^rule (\w+):\n(?:    .*\n)*?    output: ([^,\n]+)", out, re.M):
        if rule not in ("aggregate", "plot", "all"):
            jobs.setdefault(rule, set()).add(output)
    return jobs


def cells_of(jobs: dict[str, set[str]], rule: str = "benchmark") -> set[str]:
    """The method part of each planned job's cell name (`ar`, `speculative-int8-g3`, ...)."""
    return {re.search(r"--specdec-(.+?)--", path).group(1) for path in jobs.get(rule, ())}


ALL = {"ar", "speculative-int8-g3", "ngram-ngram-g3"}


@pytest.mark.parametrize("edit, stale", [
    (lambda c: c["drafters"]["ngram"].update(n=4), {"ngram-ngram-g3"}),
    (lambda c: c["drafters"]["ngram"].update(min_context=1), {"ngram-ngram-g3"}),
    (lambda c: c["experiments"]["tiny"]["methods"][1].update(reference="separate"), {"speculative-int8-g3"}),
    (lambda c: c["experiments"]["tiny"].update(warmup=0), ALL),
    (lambda c: c["experiments"]["tiny"].update(timeout_s=600), ALL),
    (lambda c: c["power"].update(interval_ms=50), ALL),
    (lambda c: c["experiments"]["tiny"].update(attribution=False), ALL),
], ids=["ngram-n", "min_context", "reference", "warmup", "timeout_s", "power", "attribution"])
def test_a_setting_outside_the_cell_name_reruns_exactly_its_cells(settled_tiny, edit, stale):
    import yaml

    from conftest import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    edit(config)
    (settled_tiny / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        jobs = planned(settled_tiny)
    finally:
        (settled_tiny / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    assert cells_of(jobs, "cell") == stale and cells_of(jobs) == stale
    assert set(jobs) == {"cell", "benchmark"}


@pytest.fixture(scope="module")
def settled_tiny(make_study):
    from conftest import TINY_CONFIG

    workdir = make_study(TINY_CONFIG)
    settle(workdir)
    return workdir


def test_an_unreadable_result_reruns_its_cell(settled_tiny):
    result = settled_tiny / "results/runs/tiny/sample--specdec-ngram-ngram-g3--b1-n8-t0-cpu--r0/result.json"
    result.write_text('{"status": "ok", "metr')  # cut short
    proc = snakemake("-n", "--cores", "1", cwd=settled_tiny)
    assert f"{result.relative_to(settled_tiny)}: cannot read JSON" in proc.stderr
    assert (result.parent / "result.json.unreadable").read_text() == '{"status": "ok", "metr'
    assert cells_of(planned(settled_tiny)) == {"ngram-ngram-g3"}
    result.write_text("{}\n")  # as settled, for the other tests of the module
    assert planned(settled_tiny) == {}


def test_an_edited_dataset_file_reruns_its_preparation_and_cells(make_study, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say hi."]}) + "\n")
    workdir = make_study({
        "models": {"smollm2": {"source": "embedded"}},
        "drafters": {"ngram": {"kind": "ngram", "n": 3}},
        "datasets": {"mt": {"source": "mtbench", "path": str(questions)}, "sample": {"source": "sample", "num_prompts": 1}},
        "experiments": {"x": {"target": "smollm2", "datasets": ["mt", "sample"], "methods": [{"method": "ar"}],
                              "max_new_tokens": 2}},
    })
    settle(workdir)
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Say bye."]}) + "\n")
    jobs = planned(workdir)
    assert jobs["prepare_dataset"] == {"results/prompts/mt.jsonl"}
    assert {path.split("/")[3].split("--")[0] for path in jobs["benchmark"]} == {"mt"}


def test_replaced_local_weights_rerun_the_cells_using_them(make_study, tmp_path, embedded_model_dir):
    """The same size and modification time as the weights they replace: only the content is new."""
    import os

    from conftest import tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama(folder, vocab_size=49152, tokenizer_of=embedded_model_dir)
    workdir = make_study({
        "models": {"smollm2": {"source": "embedded"}, "tiny": {"source": "local", "path": str(folder)}},
        "drafters": {"ngram": {"kind": "ngram", "n": 3}},
        "datasets": {"sample": {"source": "sample", "num_prompts": 1}, "other": {"source": "sample", "num_prompts": 1}},
        "experiments": {
            "t": {"target": "tiny", "datasets": ["sample"], "methods": [{"method": "ar"}], "max_new_tokens": 2},
            "s": {"target": "smollm2", "datasets": ["other"], "methods": [{"method": "ar"}], "max_new_tokens": 2},
        },
    })
    settle(workdir)
    weights = folder / "model.safetensors"
    before = weights.stat()
    tiny_llama(tmp_path / "other", vocab_size=49152)
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size
    jobs = planned(workdir)
    assert {path.split("/")[2] for path in jobs["benchmark"]} == {"t"}  # not the smollm2 experiment's
    assert jobs["choose_kernels"] == {"results/kernels/tiny--float32--b1.json"}
    assert jobs["prepare_dataset"] == {"results/prompts/sample.jsonl"}  # its prompts are measured with tiny's tokenizer
