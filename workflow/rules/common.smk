import json

from snakemake.utils import validate

import specdec.config
import specdec.placement

validate(config, schema="../schemas/config.schema.yaml")
specdec.config.check_references(config)

RESULTS = config["results_dir"]
CELLS = {
    f"{cell['experiment']}/{cell['cell']}": cell
    for cell in specdec.config.expand_matrix(config)
}

# Optional SLURM resources of the benchmark rule (the executor plugin reads these names).
SLURM_PLACEMENT = {
    resource: config["slurm"][key]
    for resource, key in (("gpu_model", "gpu_model"), ("slurm_partition", "partition"))
    if key in config["slurm"]
}


wildcard_constraints:
    experiment="[^/]+",
    cell="[^/]+",
    dataset="[^/]+",
    model="[^/]+",


def run_results():
    """Every result file of the configured matrix."""
    return [f"{RESULTS}/runs/{key}/result.json" for key in CELLS]


def experiments():
    return list(config["experiments"])


def cell_of(wildcards):
    return CELLS[f"{wildcards.experiment}/{wildcards.cell}"]


def cell_json(wildcards):
    return json.dumps(cell_of(wildcards), sort_keys=True)


def embedded_models():
    return [
        name for name, spec in config["models"].items() if spec["source"] == "embedded"
    ]


def model_inputs(wildcards):
    """Prepared folders of the embedded models that a cell uses."""
    return [
        f"resources/models/{name}"
        for name in cell_of(wildcards)["models"]
        if name in embedded_models()
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


def reference_requests(wildcards):
    """Greedy speculative cells are checked token for token against their AR cell."""
    if not config["correctness"]["check_greedy"]:
        return []
    reference = specdec.config.reference_cell(cell_of(wildcards), list(CELLS.values()))
    if reference is None:
        return []
    return [
        f"{RESULTS}/runs/{reference['experiment']}/{reference['cell']}/requests.jsonl"
    ]


def benchmark_gpus(wildcards):
    cell = cell_of(wildcards)
    return specdec.placement.gpus_required(
        cell["placement"]["strategy"],
        cell["placement"],
        has_drafter=cell["drafter"] is not None,
    )


def benchmark_threads(wildcards):
    """A CPU cell takes every local core, so that no two timed CPU jobs overlap; on a
    cluster (no local core count) it asks for `slurm.cpus_per_task`."""
    if benchmark_gpus(wildcards):
        return 1
    return workflow.resource_settings.cores or config["slurm"]["cpus_per_task"]
