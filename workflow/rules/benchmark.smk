rule benchmark:
    input:
        prompts=lambda wildcards: f"{RESULTS}/prompts/{cell_of(wildcards)['dataset']}.jsonl",
        models=model_inputs,
        reference=reference_requests,
    output:
        result=f"{RESULTS}/runs/{{experiment}}/{{cell}}/result.json",
        requests=f"{RESULTS}/runs/{{experiment}}/{{cell}}/requests.jsonl",
    log:
        "logs/benchmark/{experiment}/{cell}.log",
    conda:
        "../../envs/specdec.yaml"
    threads: benchmark_threads
    resources:
        **SLURM_PLACEMENT,
        gpu=benchmark_gpus,
        mem_mb=config["slurm"]["mem_mb"],
        runtime=config["slurm"]["runtime"],
        cpus_per_gpu=config["slurm"]["cpus_per_gpu"],
    params:
        cell=cell_json,
        reference=lambda wildcards, input: (
            f"--reference {input.reference}" if input.reference else ""
        ),
    shell:
        "specdec run --cell-json {params.cell:q} --prompts {input.prompts}"
        " --out-dir $(dirname {output.result}) --threads {threads} {params.reference}"
        " > {log} 2>&1"
