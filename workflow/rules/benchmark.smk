rule benchmark:
    input:
        prompts=lambda wildcards: f"{RESULTS}/prompts/{cell_of(wildcards)['dataset']}.jsonl",
        models=model_inputs,
        reference=reference_requests,
    output:
        result=f"{RESULTS}/runs/{{experiment}}/{{cell}}/result.json",
        requests=f"{RESULTS}/runs/{{experiment}}/{{cell}}/requests.jsonl",
    params:
        cell=cell_json,
        reference=lambda wildcards, input: (
            f"--reference {input.reference}" if input.reference else ""
        ),
    log:
        "logs/benchmark/{experiment}/{cell}.log",
    threads: benchmark_threads
    resources:
        gpu=benchmark_gpus,
        mem_mb=config["slurm"]["mem_mb"],
        runtime=config["slurm"]["runtime"],
        cpus_per_gpu=config["slurm"]["cpus_per_gpu"],
        **({"gpu_model": config["slurm"]["gpu_model"]} if "gpu_model" in config["slurm"] else {}),
        **({"slurm_partition": config["slurm"]["partition"]} if "partition" in config["slurm"] else {}),
    conda:
        "../../envs/specdec.yaml"
    shell:
        "specdec run --cell-json {params.cell:q} --prompts {input.prompts}"
        " --out-dir $(dirname {output.result}) --threads {threads} {params.reference}"
        " > {log} 2>&1"
