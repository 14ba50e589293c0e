# The cell's typed settings travel to its job as a file (records.write_cell), not as a string
# the job parses again; a changed setting rewrites the file, and so reruns the cell. Snakemake
# compares only params it can write down (strings, numbers, lists), not a Cell object: the
# param is the cell's JSON text.
rule cell:
    output:
        cell=f"{RESULTS}/runs/{{experiment}}/{{cell}}/cell.json",
    log:
        "logs/cell/{experiment}/{cell}.log",
    params:
        cell=cell_json,
    run:
        specdec.records.write_cell(cell_of(wildcards), output.cell)


rule benchmark:
    input:
        cell=rules.cell.output.cell,
        prompts=cell_prompts,
        models=model_inputs,
        datasets=cell_dataset_files,
        reference=reference_requests,
        parity=parity_requests,
        kernels=kernel_choice_inputs,
        head=cell_head,
    output:
        result=f"{RESULTS}/runs/{{experiment}}/{{cell}}/result.json",
        requests=f"{RESULTS}/runs/{{experiment}}/{{cell}}/requests.jsonl",
    log:
        "logs/benchmark/{experiment}/{cell}.log",
    conda:
        cell_environment
    threads: benchmark_threads
    resources:
        **SLURM_PLACEMENT,
        gpu=benchmark_gpus,
        mem_mb=config["slurm"]["mem_mb"],
        runtime=config["slurm"]["runtime"],
        cpus_per_gpu=config["slurm"]["cpus_per_gpu"],
    params:
        out_dir=lambda wildcards: f"{RESULTS}/runs/{wildcards.experiment}/{wildcards.cell}",
        reference=reference_option,
        datasets=dataset_file_options,
        fingerprints=cell_model_fingerprints,
        specdec=specdec_command,
    shell:
        "{params.specdec} run --cell {input.cell:q} --prompts {input.prompts:q}"
        " --out-dir {params.out_dir:q} --threads {threads} {params.reference}"
        " {params.datasets} --log {log:q}"
