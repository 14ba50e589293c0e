# A learned head (EAGLE-3, Medusa) trained for its target, before the cells that draft with
# it: self-distilled on offline text that shares no prompt with the experiments' datasets
# (prepare/head_training.py). A killed run resumes from the state beside the head's folder.
rule train_drafter:
    input:
        model=head_target_input,
        prompts=head_evaluation_prompts,
    output:
        config=f"{RESULTS}/heads/{{drafter}}/config.json",
        weights=f"{RESULTS}/heads/{{drafter}}/model.safetensors",
        training=f"{RESULTS}/heads/{{drafter}}/training.json",
    log:
        "logs/train_drafter/{drafter}.log",
    benchmark:
        "benchmarks/train_drafter/{drafter}.tsv"
    conda:
        "../../envs/specdec.yaml"
    threads: cpu_threads()
    resources:
        gpu=head_gpus,
        mem_mb=config["slurm"]["mem_mb"],
        runtime=config["slurm"]["runtime"],
    params:
        job=head_job_json,
        fingerprints=head_target_fingerprints,
        specdec=SPECDEC,
    shell:
        "{params.specdec} train-head --spec {params.job:q} --prompts {input.prompts:q}"
        " --threads {threads} --gpus {resources.gpu} --log {log:q}"
