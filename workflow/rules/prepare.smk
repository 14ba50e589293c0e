rule prepare_model:
    output:
        model=directory("resources/models/{model}"),
    log:
        "logs/prepare_model/{model}.log",
    conda:
        "../../envs/specdec.yaml"
    shell:
        "specdec prepare-model --out {output.model} > {log} 2>&1"


rule prepare_dataset:
    input:
        model=dataset_model_input,
    output:
        prompts=f"{RESULTS}/prompts/{{dataset}}.jsonl",
    log:
        "logs/prepare_dataset/{dataset}.log",
    conda:
        "../../envs/specdec.yaml"
    params:
        spec=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]),
        model=lambda wildcards: dataset_tokenizer_model(wildcards.dataset),
        model_spec=lambda wildcards: json.dumps(
            config["models"][dataset_tokenizer_model(wildcards.dataset)]
        ),
        seed=config["seed"],
    shell:
        "specdec prepare-dataset --name {wildcards.dataset} --spec {params.spec:q}"
        " --model {params.model} --model-spec {params.model_spec:q} --seed {params.seed}"
        " --out {output.prompts} > {log} 2>&1"
