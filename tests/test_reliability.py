"""Reliability: bad input fails clearly and writes nothing; a failing cell is recorded and the
matrix goes on; an interrupted job leaves nothing that looks finished; runs are repeatable;
no remote code, escaping path or secret gets through."""

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cell_inputs, tiny_llama

from specdec import cli
from specdec.job import runner
from specdec.report.aggregate import failed_table, read_runs, runs_table
from specdec.gate.cells import DrafterSpec, Load, ModelSpec, Placement
from specdec.gate.config import ConfigError, expand_matrix, validate
from specdec.prepare.datasets import prepare_dataset_file
from specdec.job.load import arrival_times
from specdec.prepare.models import load_model, load_tokenizer
from specdec.records import read_prompts, read_requests, write_cell

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUTPUTS = ("result.json", "requests.jsonl")
SECRET = "hf_secret_test_value"

CONFIG = {
    "seed": 5,
    "models": {"smollm2": {"source": "embedded"}},
    "drafters": {"int8": {"kind": "quantized", "dtype": "int8"}},
    "datasets": {"sample": {"source": "sample", "num_prompts": 2, "turns": "first"}},
    "experiments": {
        "rel": {
            "target": "smollm2",
            "datasets": ["sample"],
            "methods": [{"method": "ar"}, {"method": "speculative", "drafter": "int8", "gamma": 3}],
            "max_new_tokens": 8,
            "warmup": 1,
        }
    },
    "power": {"idle_s": 0},
    "aggregate": {"n_resamples": 100},
}
DATASET_ARGS = ["--model", "smollm2", "--model-spec", '{"source": "embedded"}', "--seed", "5"]


def fresh_config() -> dict:
    return json.loads(json.dumps(CONFIG))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, embedded_model_dir):
    """A work dir with the embedded model under models/, the prompts file and the two cells."""
    work = tmp_path_factory.mktemp("reliability")
    models_dir, prompts = cell_inputs(work, embedded_model_dir, CONFIG["datasets"]["sample"], seed=5)
    cells = {cell.method: cell for cell in expand_matrix(validate(fresh_config()))}
    return {"work": work, "models": models_dir, "prompts": prompts, "cells": cells}


@pytest.fixture(scope="module")
def ar_run(tiny):
    """The AR cell run once in-process: its out dir."""
    out = tiny["work"] / "ar"
    result = runner.run_cell(tiny["cells"]["ar"], tiny["prompts"], out, models_dir=tiny["models"])
    assert result["status"] == "ok", result["failure"]
    return out


def cell_file(path: Path, cell) -> Path:
    """A cell file as the workflow's cell rule writes it, or raw JSON (`cell` a dict)."""
    if isinstance(cell, dict):
        path.write_text(json.dumps(cell))
    else:
        write_cell(cell, path)
    return path


def specdec_error(capsys, *argv: str) -> str:
    """Run `specdec ARGV` in-process; it must exit 2 with one error line and no traceback."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"specdec {argv[0]}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def run_error(capsys, tiny, tmp_path, cell, prompts: Path | None = None) -> str:
    """`specdec run` of a bad cell: the error line; nothing written to the out dir."""
    out = tmp_path / "out"
    line = specdec_error(capsys, "run", "--cell", str(cell_file(tmp_path / "cell.json", cell)), "--prompts", str(prompts or tiny["prompts"]),
                         "--out-dir", str(out), "--models-dir", str(tiny["models"]))
    assert not any((out / name).exists() for name in OUTPUTS)
    return line


def assert_no_outputs(out: Path) -> None:
    """Neither output, and no temp file Snakemake or aggregation could take for one."""
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in names if n in OUTPUTS or n.endswith(".tmp")], names


# --- 1. bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, bad", [
    ("batch_size", "four", "four"),
    ("methods", [{"method": "beam"}], "beam"),
    ("placement", "sideways", "sideways"),
], ids=["schema", "method", "strategy"])
def test_config_error_names_the_key(capsys, tmp_path, key, value, bad):
    config = fresh_config()
    config["experiments"]["rel"][key] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    line = specdec_error(capsys, "run", "--config", str(tmp_path / "bad.yaml"), "--cell-id", "rel/x",
                         "--prompts", "p.jsonl", "--out-dir", str(tmp_path / "out"))
    assert f"config key 'experiments.rel.{key}" in line and repr(bad) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"method": "beam"}, r"cell.json: $.method: 'beam' is not one of"),
    ({"placement": {"strategy": "sideways"}}, "cell.json: $.placement"),
    ({"gamma": 1000}, "cell.json: $.gamma: 1000 is greater than the maximum of 32"),
    ("{}", "cell.json: $: 'experiment' is a required property"),
], ids=["method", "strategy", "gamma", "empty"])
def test_a_bad_cell_file_fails_before_loading_naming_the_key(capsys, tiny, tmp_path, change, message):
    cell = {} if change == "{}" else tiny["cells"]["ar"].to_dict() | change
    assert message in run_error(capsys, tiny, tmp_path, cell)


def test_a_missing_cell_file_is_one_line(capsys, tiny, tmp_path):
    line = specdec_error(capsys, "run", "--cell", str(tmp_path / "nope.json"), "--prompts", str(tiny["prompts"]),
                         "--out-dir", str(tmp_path / "out"))
    assert f"{tmp_path / 'nope.json'}: cannot read JSON" in line


@pytest.mark.parametrize("name, content, spec, message", [
    ("missing.jsonl", None, {}, "dataset file not found: {path}"),
    ("broken.json", '[{"question_id": 1,', {}, "{path}: not valid JSON (line 1)"),
    ("object.json", '{\n "question_id": 1,\n "turns": ["hi"]\n}\n', {}, "{path}: one JSON object spanning the file"),
    ("lines.jsonl", '{"question_id": 1, "category": "c", "turns": ["hi"]}\n{oops\n', {"on_malformed": "fail"},
     "{path}:2: not valid JSON"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, {}, "{path}: not valid JSON (line 1): nested too deeply"),
    ("deep.jsonl", '{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n", {"on_malformed": "fail"},
     "{path}:1: not valid JSON: nested too deeply"),
    ("short.jsonl", '{"question_id": 1, "category": "c", "turns": ["a long question " ]}\n', {"max_prompt_tokens": 1},
     "max_prompt_tokens"),
], ids=["missing", "not-json", "other-shape", "malformed-line", "nested-array", "nested-line", "empty-after-filter"])
def test_bad_dataset_file_fails_naming_it(capsys, tiny, tmp_path, name, content, spec, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "prompts.jsonl"
    spec = {"source": "mtbench", "path": str(path)} | spec
    line = specdec_error(capsys, "prepare-dataset", "--name", "bad", "--spec", json.dumps(spec), *DATASET_ARGS,
                         "--models-dir", str(tiny["models"]), "--out", str(out))
    assert message.format(path=path) in line
    assert not out.exists() and not list(tmp_path.glob(".prompts.jsonl.*"))


def test_prepare_dataset_writes_every_skipped_record_with_file_and_line(tiny, tmp_path):
    """Malformed and prompt-less records alike, as CSV and as an HTML table for the report."""
    path = tmp_path / "sg.jsonl"
    path.write_text('{"id": "a", "conversations": [{"from": "human", "value": "Hello?"}]}\n'
                    '{"id": "b", "conversations": [{"from": "gpt", "value": "Nobody asked."}]}\n'
                    '{"id": "c", "conversations": "none"}\n')
    spec = {"source": "sharegpt", "paths": [str(path)]}
    out, skipped = tmp_path / "sg.prompts.jsonl", tmp_path / "sg.skipped.csv"
    code = cli.main(["prepare-dataset", "--name", "sg", "--spec", json.dumps(spec), *DATASET_ARGS, "--models-dir",
                     str(tiny["models"]), "--out", str(out), "--skipped", str(skipped),
                     "--skipped-html", str(tmp_path / "sg.skipped.html")])
    assert code == 0 and [r["id"] for r in read_prompts(out)] == ["sg/a"]
    assert list(csv.reader(skipped.open())) == [["file", "line", "reason"], [str(path), "2", "no human turn to prompt with"],
                                                [str(path), "3", "key 'conversations' must be array, got string"]]
    html = (tmp_path / "sg.skipped.html").read_text()
    assert re.search(rf"<td>{re.escape(str(path))}</td>\s*<td>2</td>\s*<td>no human turn to prompt with</td>", html)


def local_target(tiny, path: Path):
    return dataclasses.replace(tiny["cells"]["ar"], target=ModelSpec("smollm2", "local", path=str(path)))


def test_missing_model_path_names_the_key(capsys, tiny, tmp_path):
    line = run_error(capsys, tiny, tmp_path, local_target(tiny, tmp_path / "nowhere"))
    assert f"config key 'models.smollm2.path': {tmp_path / 'nowhere'} does not exist" in line


def test_encoder_model_is_not_a_causal_lm(capsys, tiny, tmp_path):
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path / "bert")
    line = run_error(capsys, tiny, tmp_path, local_target(tiny, tmp_path / "bert"))
    assert "model 'smollm2'" in line and "'bert' model, not a causal language model" in line


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("file, part", [
    ("config.json", "config"),
    ("tokenizer.json", "tokenizer"),
    ("model.safetensors", "weights"),
])
def test_truncated_model_file_is_one_line_naming_it(capsys, tiny, tmp_path, embedded_model_dir, file, part):
    tiny_llama(tmp_path / "model", 49152, tokenizer_of=embedded_model_dir)
    truncated(tmp_path / "model" / file)
    line = run_error(capsys, tiny, tmp_path, local_target(tiny, tmp_path / "model"))
    assert f"model 'smollm2': cannot load its {part} from " in line and str(tmp_path / "model" / file) in line


@pytest.mark.parametrize("content", [
    '{"version": "1.0", "model": 5}',  # transformers: KeyError
    '{"version": "1.0", "added_tokens": [], "model": 5}',  # tokenizers: a bare Exception
    "[1, 2]",  # TypeError
])
def test_tokenizer_json_of_the_wrong_shape_is_one_line_naming_it(capsys, tiny, tmp_path, embedded_model_dir, content):
    tiny_llama(tmp_path / "model", 49152, tokenizer_of=embedded_model_dir)
    (tmp_path / "model" / "tokenizer.json").write_text(content)
    line = run_error(capsys, tiny, tmp_path, local_target(tiny, tmp_path / "model"))
    assert f"model 'smollm2': cannot load its tokenizer from {tmp_path / 'model' / 'tokenizer.json'}: " in line


def test_known_model_type_with_its_own_model_code_needs_trust(capsys, tiny, tmp_path, embedded_model_dir):
    """A llama config whose auto_map names its own modelling code: not 'not a causal LM'."""
    tiny_llama(tmp_path / "model", 49152, tokenizer_of=embedded_model_dir)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    line = run_error(capsys, tiny, tmp_path, local_target(tiny, tmp_path / "model"))
    assert line.endswith("ships its own Python code and needs trust_remote_code: true (models.smollm2)")


def tiny_llama_with_own_vocabulary(folder: Path) -> None:
    """A one-layer Llama with a 3-word tokenizer: a drafter whose vocabulary is not the target's."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tiny_llama(folder, 3)
    words = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


def test_drafter_with_another_vocabulary_fails_before_decoding(capsys, tiny, tmp_path):
    tiny_llama_with_own_vocabulary(tmp_path / "tiny")
    drafter = DrafterSpec("tiny", "model", model=ModelSpec("tiny", "local", path=str(tmp_path / "tiny")))
    line = run_error(capsys, tiny, tmp_path, dataclasses.replace(tiny["cells"]["speculative"], drafter=drafter))
    assert "drafter tokenizer differs from the target's (3 vs 49152 tokens" in line


def test_drafter_smaller_than_its_tokenizer_fails_before_decoding(capsys, tiny, tmp_path, embedded_model_dir):
    """The target's tokenizer, but an embedding table of 100 rows: the first token id past it
    would raise IndexError mid-decode."""
    tiny_llama(tmp_path / "tiny", 100, tokenizer_of=embedded_model_dir)
    drafter = DrafterSpec("tiny", "model", model=ModelSpec("tiny", "local", path=str(tmp_path / "tiny")))
    line = run_error(capsys, tiny, tmp_path, dataclasses.replace(tiny["cells"]["speculative"], drafter=drafter))
    assert "drafter vocab_size 100" in line and "49152 tokens of the shared tokenizer" in line


def test_prompt_longer_than_the_context_names_request_and_limit(capsys, tiny, tmp_path):
    long = {"id": "long/1", "dataset": "long", "category": "c", "system": None, "turns": ["word " * 9000], "prompt_tokens": 9000}
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps(long) + "\n")
    line = run_error(capsys, tiny, tmp_path, tiny["cells"]["ar"], prompts)
    assert "request long/1#1:" in line and "max_new_tokens 8" in line
    assert "exceed the models' context of 8192" in line


def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_an_output_folder_that_cannot_be_written_fails_before_any_model_loads(capsys, monkeypatch, tiny, tmp_path):
    monkeypatch.setattr(runner, "open_engine", no_loading)
    (tmp_path / "a file").write_text("")
    out = tmp_path / "a file" / "out"
    line = specdec_error(capsys, "run", "--cell", str(cell_file(tmp_path / "cell.json", tiny["cells"]["ar"])),
                         "--prompts", str(tiny["prompts"]), "--out-dir", str(out), "--models-dir", str(tiny["models"]))
    assert f"output folder {out} cannot be written" in line


def test_a_disk_that_fills_up_during_the_decode_is_one_line_and_no_result(capsys, monkeypatch, tiny, tmp_path):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner, "write_requests", full)
    out = tmp_path / "out"
    line = specdec_error(capsys, "run", "--cell", str(cell_file(tmp_path / "cell.json", tiny["cells"]["ar"])),
                         "--prompts", str(tiny["prompts"]), "--out-dir", str(out), "--models-dir", str(tiny["models"]))
    assert f"output folder {out} cannot be written: No space left on device" in line
    assert_no_outputs(out)


def test_a_gpu_placement_on_a_machine_without_gpus_is_one_line(capsys, monkeypatch, tiny, tmp_path):
    monkeypatch.setattr(runner, "open_engine", no_loading)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("SPECDEC_NUM_GPUS", "0")
    monkeypatch.setenv("SPECDEC_GPU_LOCK_DIR", str(tmp_path / "locks"))
    cell = dataclasses.replace(tiny["cells"]["ar"], placement=Placement("same"))
    line = run_error(capsys, tiny, tmp_path, cell)
    assert line.endswith("this job needs 1 GPU(s) but the machine has 0 (SPECDEC_NUM_GPUS)")
    assert not (tmp_path / "out").exists()


def test_a_cell_another_process_is_running_refuses_to_start_naming_its_pid(capsys, monkeypatch, tiny, tmp_path):
    monkeypatch.setattr(runner, "open_engine", no_loading)
    cell, out = tiny["cells"]["ar"], tmp_path / "out"
    holding = f"""
import sys, time
from pathlib import Path
from specdec.job.runner import claimed
with claimed(Path({str(out)!r}), {cell.id!r}):
    print("held", flush=True)
    time.sleep(600)
"""
    holder = subprocess.Popen([sys.executable, "-c", holding], env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = run_error(capsys, tiny, tmp_path, cell)
    finally:
        holder.kill()
        holder.wait()
    assert f"cell {cell.id} is running already: pid={holder.pid} {cell.id} holds {out}/.cell.lock" in line
    with pytest.raises(AssertionError, match="a model was loaded"):  # the lock died with its holder
        runner.run_cell(cell, tiny["prompts"], out, models_dir=tiny["models"])


# --- 2. failure isolation --------------------------------------------------------------------


def failed_row(out: Path) -> dict:
    rows = failed_table(runs_table(read_runs([out / "result.json"])))
    assert len(rows) == 1
    return rows.iloc[0].to_dict()


@pytest.mark.parametrize("error", [RuntimeError("engine broke"), torch.OutOfMemoryError("CUDA out of memory (simulated)")],
                         ids=["RuntimeError", "OutOfMemoryError"])
def test_decoding_failure_is_a_failed_result(monkeypatch, tiny, tmp_path, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("specdec.engines.specdec.generate", broken)
    result = runner.run_cell(tiny["cells"]["ar"], tiny["prompts"], tmp_path, models_dir=tiny["models"])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written == result and result["status"] == "failed" and result["metrics"] is None
    assert result["failure"]["type"] == type(error).__name__ and result["failure"]["phase"] == "measure"
    assert result["failure"]["message"] == str(error) and result["failure"]["memory_mb"] > 0
    assert read_requests(tmp_path / "requests.jsonl") == []
    row = failed_row(tmp_path)
    assert (row["status"], row["type"], row["phase"]) == ("failed", type(error).__name__, "measure")


def test_cell_past_its_timeout_is_failed_and_the_cli_exits_0(capsys, tiny, tmp_path):
    cell = dataclasses.replace(tiny["cells"]["speculative"], timeout_s=0.5)
    code = cli.main(["run", "--cell", str(cell_file(tmp_path / "cell.json", cell)), "--prompts", str(tiny["prompts"]),
                     "--out-dir", str(tmp_path), "--models-dir", str(tiny["models"])])
    assert code == 0
    row = failed_row(tmp_path)
    assert (row["type"], row["phase"]) == ("CellTimeout", "measure")
    assert "timeout_s" in row["message"]


# --- 3. interruption -------------------------------------------------------------------------


def long_cell(tiny):
    """The AR cell over 60 requests."""
    return dataclasses.replace(tiny["cells"]["ar"], load=Load(num_requests=60))


def start_long_run(tiny, out: Path) -> tuple[subprocess.Popen, Path]:
    """`specdec run` of the AR cell over 60 requests, logging to a file; returns once it has
    decoded in its measured window for a second."""
    cell = long_cell(tiny)
    log = out.parent / f"{out.name}.log"
    command = [str(BIN / "specdec"), "run", "--cell", str(cell_file(out.parent / f"{out.name}.cell.json", cell)), "--prompts", str(tiny["prompts"]),
               "--out-dir", str(out), "--models-dir", str(tiny["models"]), "--threads", "1"]
    environment = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + 120
    while "measuring 60 requests" not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1)
    assert process.poll() is None, log.read_text()[-3000:]
    return process, log


def test_sigkill_leaves_nothing_that_looks_finished(tiny, tmp_path):
    process, _ = start_long_run(tiny, tmp_path / "out")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert_no_outputs(tmp_path / "out")


def test_sigterm_exits_143_and_records_where_it_stopped(tiny, tmp_path):
    process, log = start_long_run(tiny, tmp_path / "out")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert_no_outputs(tmp_path / "out")
    interrupted = json.loads((tmp_path / "out" / "interrupted.json").read_text())
    assert interrupted["signal"] == "SIGTERM" and interrupted["phase"] == "measure"
    assert interrupted["cell_id"] == long_cell(tiny).id and interrupted["status"] == "interrupted"


def snakemake_command(*args: str) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2", *args]


def test_snakemake_killed_mid_matrix_reruns_only_unfinished_jobs(tiny, tmp_path, embedded_model_dir):
    config = fresh_config()
    config["experiments"]["rel"]["reference"] = "separate"  # the speculative job waits for the AR cell's
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "resources" / "models").mkdir(parents=True)
    (tmp_path / "resources" / "models" / "smollm2").symlink_to(embedded_model_dir)
    # Prompts prepared beforehand (newer than the model, so kept): the matrix alone runs.
    (tmp_path / "results" / "prompts").mkdir(parents=True)
    shutil.copy(tiny["prompts"], tmp_path / "results" / "prompts" / "sample.jsonl")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    ar, spec = (cell.name for cell in expand_matrix(validate(config)))
    spec_log = tmp_path / "logs" / "benchmark" / "rel" / f"{spec}.log"
    process = subprocess.Popen(snakemake_command(), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 150
    # The speculative cell starts once the AR cell (its reference) has finished; its log
    # appears as its job starts, seconds before it could finish.
    while not spec_log.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    time.sleep(1)  # the killed group's files are closed
    runs = tmp_path / "results" / "runs" / "rel"
    assert (runs / ar / "result.json").is_file()
    assert_no_outputs(runs / spec)

    plan = subprocess.run(snakemake_command("-n"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr[-3000:]
    text = plan.stdout + plan.stderr
    assert "profiles/default" in text  # the workflow profile (rerun-incomplete) is in force
    assert set(re.findall(r"output: \S*runs/rel/([^/]+)/result\.json", text)) == {spec}, text[-3000:]
    assert set(re.findall(r"^(?:local)?rule (\w+):", text, re.M)) == {"benchmark", "aggregate", "plot", "all"}


# --- 4. determinism --------------------------------------------------------------------------


def test_same_seed_same_prompts_and_arrivals(tiny, tmp_path, embedded_model_dir):
    tokenizer = load_tokenizer(str(embedded_model_dir))
    spec = {"source": "sample", "num_prompts": 5}
    for name in ("a.jsonl", "b.jsonl"):
        prepare_dataset_file(spec, tokenizer, tmp_path / name, seed=11)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    prepare_dataset_file(spec, tokenizer, tmp_path / "c.jsonl", seed=12)
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    load = Load("open", rate=3.0, arrival="gamma", burstiness=0.5, num_requests=20)
    assert arrival_times(load, 7) == arrival_times(load, 7) != arrival_times(load, 8)


def test_result_config_reruns_the_cell_alone_identically_without_leaking_secrets(tiny, ar_run, tmp_path):
    """Also the secrets check: the rerun has HF_TOKEN set; it appears in no output or log."""
    result = json.loads((ar_run / "result.json").read_text())
    (tmp_path / "cell.json").write_text(json.dumps(result["config"]))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_TOKEN=SECRET)
    rerun = subprocess.run(
        [str(BIN / "specdec"), "run", "--cell", str(tmp_path / "cell.json"), "--prompts", str(tiny["prompts"]),
         "--out-dir", str(tmp_path / "out"), "--models-dir", str(tiny["models"])],
        env=env, capture_output=True, text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    first, second = read_requests(ar_run / "requests.jsonl"), read_requests(tmp_path / "out" / "requests.jsonl")
    assert [r["request_id"] for r in first] == [r["request_id"] for r in second]
    assert [r["output_ids"] for r in first] == [r["output_ids"] for r in second]
    assert all(len(r["output_ids"]) > 0 for r in second)
    written = [(tmp_path / "out" / name).read_text() for name in OUTPUTS]
    assert not [text for text in (*written, rerun.stdout, rerun.stderr) if SECRET in text]


# --- 5. security -----------------------------------------------------------------------------


def test_results_dir_cannot_escape_the_working_directory():
    for results_dir in ("../x", "/abs/results", "results/../../x"):
        config = fresh_config() | {"results_dir": results_dir}
        with pytest.raises(ConfigError, match="config key 'results_dir'"):
            validate(config)


@pytest.mark.parametrize("trusted", [False, True])
def test_trust_remote_code_is_passed_only_when_configured(monkeypatch, embedded_model_dir, trusted):
    import transformers

    seen = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        auto = getattr(transformers, name)
        real = auto.from_pretrained

        def recording(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", recording)
    load_model(ModelSpec("smollm2", "local", path=str(embedded_model_dir), trust_remote_code=trusted), Path("unused"))
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert {flag for _, flag in seen} == {trusted}
