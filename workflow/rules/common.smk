import json
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

import specdec.config
import specdec.engines
import specdec.placement
import specdec.records
import specdec.session

# The gate (after the Snakefile's YAML check): the schema (Snakemake's validate fills the
# defaults), then what a schema cannot say.
validate(config, schema="../schemas/config.schema.yaml")
specdec.config.check_references(config)

RESULTS = config["results_dir"]
CELLS = {cell.id: cell for cell in specdec.config.expand_matrix(config)}

# Optional SLURM resources of the benchmark rule (the executor plugin reads these names).
SLURM_PLACEMENT = {
    resource: config["slurm"][key]
    for resource, key in (("gpu_model", "gpu_model"), ("slurm_partition", "partition"))
    if key in config["slurm"]
}


wildcard_constraints:
    experiment="[A-Za-z0-9_-]+",
    cell="[A-Za-z0-9_.-]+",
    dataset="[A-Za-z0-9_-]+",
    model="[A-Za-z0-9_-]+",
    dtype="float32|bfloat16|float16",
    batch="[0-9]+",


def run_results():
    """Every result file of the experiments to run."""
    return [
        f"{RESULTS}/runs/{cell.id}/result.json"
        for cell in CELLS.values()
        if cell.experiment in experiments()
    ]


def experiment_runs(wildcards, name="result.json"):
    """One file of every cell of an experiment: the tables depend on every cell."""
    return [
        f"{RESULTS}/runs/{cell.id}/{name}"
        for cell in CELLS.values()
        if cell.experiment == wildcards.experiment
    ]


def experiments():
    """The experiments the default target builds (`run:`, else `default_target`)."""
    return specdec.config.experiments_to_run(config)


def experiment_slo(wildcards):
    """The experiment's `slo:`; results copied back from elsewhere may name an experiment
    this config does not have, and aggregate without SLOs."""
    return config.get("experiments", {}).get(wildcards.experiment, {}).get("slo")


def cell_of(wildcards):
    return CELLS[f"{wildcards.experiment}/{wildcards.cell}"]


def cell_prompts(wildcards):
    return f"{RESULTS}/prompts/{cell_of(wildcards).dataset}.jsonl"


def embedded_models():
    return [
        name for name, spec in config["models"].items() if spec["source"] == "embedded"
    ]


def model_inputs(wildcards):
    """Prepared folders of the embedded models that a cell uses."""
    cell = cell_of(wildcards)
    used = [cell.target, cell.drafter_model]
    return [
        f"resources/models/{spec.name}"
        for spec in used
        if spec is not None and spec.source == "embedded"
    ]


def dataset_tokenizer_model(dataset):
    """Prompt lengths are measured with the tokenizer of the first target that uses the dataset."""
    for experiment in config["experiments"].values():
        if dataset in experiment["datasets"]:
            return experiment["target"]
    return next(iter(config["models"]))


def dataset_model_input(wildcards):
    name = dataset_tokenizer_model(wildcards.dataset)
    return [f"resources/models/{name}"] if name in embedded_models() else []


def reference_requests(wildcards, engine=None):
    """Greedy outputs are checked token for token against an AR cell: a drafting cell
    against its own engine's (lossless), any cell of another engine against our engine's
    (`engine="specdec"`, parity)."""
    cell = cell_of(wildcards)
    # a replay drafter replays its AR cell's outputs: it needs them even unchecked
    replays = (
        engine is None and cell.drafter is not None and cell.drafter.kind == "replay"
    )
    if not (config["correctness"]["check_greedy"] or replays):
        return []
    if engine == cell.engine:
        return []
    reference = specdec.config.reference_cell(cell, list(CELLS.values()), engine)
    if reference is None:
        return []
    return [f"{RESULTS}/runs/{reference.id}/requests.jsonl"]


def parity_requests(wildcards):
    return reference_requests(wildcards, engine="specdec")


def reference_option(wildcards, input):
    """`--reference PATH --parity-reference PATH`, quoted: they go into the benchmark's shell
    command as they are."""
    options = [f"--reference {shlex.quote(path)}" for path in input.reference]
    options += [f"--parity-reference {shlex.quote(path)}" for path in input.parity]
    options += [
        f"--kernels {shlex.quote(f'{role}={path}')}"
        for role, path in kernel_choices(wildcards).items()
    ]
    return " ".join(options)


USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def cell_environment(wildcards):
    """The conda environment of the cell's engine (`--sdm conda`)."""
    name = "vllm" if cell_of(wildcards).engine == "vllm" else "specdec"
    return f"../../envs/{name}.yaml"


def own_specdec():
    """The `specdec` installed beside the Python that runs Snakemake, by absolute path: a
    `.venv/bin/snakemake` run must not depend on an activated environment or on PATH (by
    name, rules in a fresh shell failed with exit 127). Under --sdm conda: its env's."""
    command = Path(sys.executable).parent / "specdec"
    if USE_CONDA or not command.exists():
        return "specdec"
    return shlex.quote(str(command))


SPECDEC = own_specdec()


def specdec_command(wildcards):
    """The `specdec` that runs the cell: a vLLM cell runs in vLLM's own environment (the
    venv of `make install-vllm`, or under --sdm conda envs/vllm.yaml's). Without one, the
    job says which command installs it."""
    command = Path(config["vllm"]["venv"]) / "bin" / "specdec"
    if cell_of(wildcards).engine != "vllm" or USE_CONDA or not command.exists():
        return SPECDEC
    return shlex.quote(str(command))


def benchmark_gpus(wildcards):
    cell = cell_of(wildcards)
    return specdec.placement.gpus_required(
        cell.placement, has_drafter=cell.drafter is not None
    )


def cpu_threads():
    """A timed CPU job takes every local core, so that no two overlap; on a cluster (no
    local core count) it asks for `slurm.cpus_per_task`."""
    return workflow.resource_settings.cores or config["slurm"]["cpus_per_task"]


def benchmark_threads(wildcards):
    return 1 if benchmark_gpus(wildcards) else cpu_threads()


def kernel_choices(wildcards):
    """Role -> the kernel choice file of each float32 model our engine runs the cell with
    on the CPU: one per model, dtype and batch size, which every cell of that setup reads.
    """
    cell = cell_of(wildcards)
    return {
        role: f"{RESULTS}/kernels/"
        + specdec.session.kernel_choice_name(model, dtype, cell.batch_size)
        for role, (model, dtype) in specdec.engines.kernel_setups(cell).items()
    }


def kernel_choice_inputs(wildcards):
    return list(kernel_choices(wildcards).values())


def named_model_input(wildcards):
    name = wildcards.model
    return [f"resources/models/{name}"] if name in embedded_models() else []
