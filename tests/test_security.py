"""Security: a model folder's own Python runs only when its model says trust_remote_code: true,
whatever stdin answers to transformers' question."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cell_inputs, tiny_llama

from specdec.gate.config import expand_matrix, validate
from specdec.records import write_cell

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = {"source": "sample", "num_prompts": 1, "turns": "first"}

CONFIGURATION = """\
from pathlib import Path

from transformers import LlamaConfig

Path({marker!r}).touch()


class CustomConfig(LlamaConfig):
    model_type = "tinycustom"
"""
MODELING = """\
from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def custom_code_model(folder: Path, marker: Path, embedded_model_dir: Path) -> None:
    """A tiny random Llama whose config and model classes are the folder's own Python (an
    unknown model_type, so transformers cannot load it without that code); importing it
    touches `marker`. The embedded model's tokenizer, so that it can decode the sample."""
    tiny_llama(folder, 49152, tokenizer_of=embedded_model_dir)
    settings = json.loads((folder / "config.json").read_text())
    settings |= {"model_type": "tinycustom", "architectures": ["CustomForCausalLM"], "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(settings))
    (folder / "configuration_custom.py").write_text(CONFIGURATION.format(marker=str(marker)))
    (folder / "modeling_custom.py").write_text(MODELING)


@pytest.mark.parametrize("trusted, stdin", [(False, "y\n" * 10), (True, "")], ids=["untrusted-stdin-y", "trusted-no-stdin"])
def test_model_code_runs_only_when_trusted_whatever_stdin_says(tmp_path, embedded_model_dir, trusted, stdin):
    """Untrusted, a `y` on stdin must not run the code; trusted, it runs with nobody to ask
    (as under Snakemake or SLURM)."""
    marker = tmp_path / "model_code_ran"
    custom_code_model(tmp_path / "custom", marker, embedded_model_dir)
    _, prompts = cell_inputs(tmp_path, embedded_model_dir, SAMPLE, seed=1)
    config = validate({
        "seed": 1,
        "models": {"custom": {"source": "local", "path": str(tmp_path / "custom"), "trust_remote_code": trusted}},
        "datasets": {"sample": SAMPLE},
        "experiments": {"sec": {"target": "custom", "datasets": ["sample"], "methods": [{"method": "ar"}],
                                "max_new_tokens": 2, "warmup": 0}},
        "power": {"idle_s": 0},
    })
    [cell] = expand_matrix(config)
    cell_file = tmp_path / "cell.json"
    write_cell(cell, cell_file)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run(
        [str(BIN / "specdec"), "run", "--cell", str(cell_file), "--prompts", str(prompts),
         "--out-dir", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")],
        input=stdin, env=env, capture_output=True, text=True, timeout=300,
    )
    if trusted:
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "ok"
        assert marker.exists()
    else:
        assert not marker.exists() and not (tmp_path / "out").exists()
        assert run.returncode == 2, run.stderr[-3000:]
        assert "Traceback" not in run.stderr and "[y/N]" not in run.stdout + run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("specdec run: error: ")]
        assert len(errors) == 1 and errors[0].endswith("needs trust_remote_code: true (models.custom)"), run.stderr
