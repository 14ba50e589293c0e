import functools
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

import specdec.gate.config
import specdec.prepare.datasets
import specdec.job.fingerprints
import specdec.engines
import specdec.engines.placement
import specdec.records
import specdec.engines.session

# The gate (after the Snakefile's YAML check), as `specdec check-config`: the schema (filling
# the defaults; Snakemake's own validate would count 8.0 as an integer), what a schema cannot
# say, and the local files the config names.
specdec.gate.config.validate(config)
specdec.gate.config.check_inputs(config)

RESULTS = config["results_dir"]
CELLS = {cell.id: cell for cell in specdec.gate.config.expand_matrix(config)}


def check_results_writable():
    """A results folder that cannot be written stops a run in one line before any job
    starts, not with a job's own traceback once the DAG runs."""
    folder = Path(RESULTS).absolute()
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise specdec.gate.config.ConfigError(
            f"results folder {folder} cannot be written (results_dir: {RESULTS})"
        )


onstart:
    check_results_writable()


# An unreadable result would stand for its cell (Snakemake sees only that the file exists)
# while aggregate refuses it and the figures stay stale: it goes aside, and the cell reruns.
for cell_id in CELLS:
    if moved := specdec.records.set_aside_unreadable_result(
        f"{RESULTS}/runs/{cell_id}/result.json"
    ):
        print(moved, file=sys.stderr)

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
    return specdec.gate.config.experiments_to_run(config)


def experiment_slo(wildcards):
    """The experiment's `slo:`; results copied back from elsewhere may name an experiment
    this config does not have, and aggregate without SLOs."""
    return config.get("experiments", {}).get(wildcards.experiment, {}).get("slo")


def cell_of(wildcards):
    return CELLS[f"{wildcards.experiment}/{wildcards.cell}"]


def cell_json(wildcards):
    """Every setting of the cell, the ones its name leaves out included, as JSON text."""
    return json.dumps(cell_of(wildcards).to_dict(), sort_keys=True)


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


def dataset_files(wildcards, dataset=None):
    """The files a dataset is prepared from, inputs of its preparation and of its cells: an
    edited file reruns both. The gate above refused a missing or unreadable one already.
    """
    spec = config["datasets"][dataset or wildcards.dataset]
    return [str(path) for path in specdec.prepare.datasets.dataset_files(spec)]


def cell_dataset_files(wildcards):
    return dataset_files(wildcards, cell_of(wildcards).dataset)


def dataset_file_options(wildcards, input):
    return " ".join(f"--dataset-file {shlex.quote(path)}" for path in input.datasets)


FINGERPRINTS = specdec.job.fingerprints.DigestCache()


@functools.cache
def local_model_digest(folder):
    digest = FINGERPRINTS.digest(folder)
    FINGERPRINTS.save()
    return digest


def model_fingerprints(*names):
    """`name=sha256` of each local model folder among the named models, a param of every rule
    that reads them: replaced weights rerun the rule whatever the files' times say. (An
    embedded model's folder is a rule's output, and a hub model is its id and revision.)
    """
    specs = {name: config["models"][name] for name in names if name is not None}
    return " ".join(
        f"{name}={local_model_digest(spec['path'])}"
        for name, spec in sorted(specs.items())
        if spec["source"] == "local"
    )


def cell_model_fingerprints(wildcards):
    cell = cell_of(wildcards)
    return model_fingerprints(
        cell.target.name, cell.drafter_model and cell.drafter_model.name
    )


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
    reference = specdec.gate.config.reference_cell(cell, list(CELLS.values()), engine)
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
    cell = cell_of(wildcards)
    engine = specdec.engines.engine_class(cell.engine)
    name = "vllm" if engine.runs_in_vllm_environment(cell) else "specdec"
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


# vLLM's own environment, found by the project's rule and never named by the config (which
# must not name a program to run): SPECDEC_VLLM_VENV, else `make install-vllm`'s .venv-vllm
# beside the Snakefile.
VLLM_VENV = Path(
    os.environ.get("SPECDEC_VLLM_VENV") or Path(workflow.basedir) / ".venv-vllm"
)


def specdec_command(wildcards):
    """The `specdec` that runs the cell: a vLLM cell runs in VLLM_VENV (under --sdm conda,
    envs/vllm.yaml's). Without one, the job says which command installs it."""
    command = VLLM_VENV / "bin" / "specdec"
    cell = cell_of(wildcards)
    in_vllm = specdec.engines.engine_class(cell.engine).runs_in_vllm_environment(cell)
    if not in_vllm or USE_CONDA or not command.exists():
        return SPECDEC
    return shlex.quote(str(command))


def benchmark_gpus(wildcards):
    """The GPUs the cell's job asks for: its placement's, or a server's it starts."""
    cell = cell_of(wildcards)
    return specdec.engines.engine_class(cell.engine).gpus_required(cell)


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
        + specdec.engines.session.kernel_choice_name(model, dtype, cell.batch_size)
        for role, (model, dtype) in specdec.engines.kernel_setups(cell).items()
    }


def kernel_choice_inputs(wildcards):
    return list(kernel_choices(wildcards).values())


def named_model_input(wildcards):
    name = wildcards.model
    return [f"resources/models/{name}"] if name in embedded_models() else []


HEADS = specdec.gate.config.head_jobs(config)


def head_job_json(wildcards):
    """The head job (drafter entry, target, seed) as JSON text: a changed training setting
    retrains the head, and so reruns the cells that use it."""
    return json.dumps(HEADS[wildcards.drafter].to_dict(), sort_keys=True)


def head_target_input(wildcards):
    name = HEADS[wildcards.drafter].target.name
    return [f"resources/models/{name}"] if name in embedded_models() else []


def head_target_fingerprints(wildcards):
    return model_fingerprints(HEADS[wildcards.drafter].target.name)


def head_evaluation_prompts(wildcards):
    """The prompts of every dataset of every experiment that uses the head: the training
    text must share none of them."""
    datasets = {
        dataset
        for experiment in specdec.gate.config.experiments_using(
            config, wildcards.drafter
        )
        for dataset in experiment["datasets"]
    }
    return [f"{RESULTS}/prompts/{dataset}.jsonl" for dataset in sorted(datasets)]


def head_gpus(wildcards):
    """A GPU where any cell that uses the head is placed on GPUs; the CPU otherwise."""
    folder = HEADS[wildcards.drafter].drafter.source
    placed = [
        cell.placement
        for cell in CELLS.values()
        if cell.drafter is not None and cell.drafter.source == folder
    ]
    return int(any(p.strategy != "cpu" for p in placed))


def cell_head(wildcards):
    """A trained head's files, inputs of the cells that draft with it."""
    drafter = cell_of(wildcards).drafter
    if drafter is None or drafter.train is None:
        return []
    return [f"{drafter.source}/config.json", f"{drafter.source}/model.safetensors"]


def trainings_of(experiment):
    """The training records of the trained heads an experiment's cells draft with."""
    return sorted(
        {
            f"{cell.drafter.source}/training.json"
            for cell in CELLS.values()
            if cell.experiment == experiment
            and cell.drafter is not None
            and cell.drafter.train is not None
        }
    )


def experiment_trainings(wildcards):
    return trainings_of(wildcards.experiment)


def experiment_borrowed_heads(wildcards):
    """Drafter name -> the trained head it drafts with, where that head is another drafter's
    (`drafters.NAME.head`), for the experiment's cells."""
    return {
        cell.drafter.name: Path(cell.drafter.source).name
        for cell in CELLS.values()
        if cell.experiment == wildcards.experiment
        and cell.drafter is not None
        and cell.drafter.train is not None
        and Path(cell.drafter.source).name != cell.drafter.name
    }


def heads_reports():
    """The heads_report outputs of the experiments to run that use trained heads."""
    return [
        path
        for experiment in experiments()
        if trainings_of(experiment)
        for path in (
            f"{RESULTS}/tables/{experiment}/heads.html",
            f"{RESULTS}/figures/{experiment}/training_curve",
        )
    ]
