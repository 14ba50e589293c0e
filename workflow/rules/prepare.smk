rule prepare_model:
    output:
        model=directory("resources/models/{model}"),
    log:
        "logs/prepare_model/{model}.log",
    conda:
        "../../envs/specdec.yaml"
    params:
        specdec=SPECDEC,
    shell:
        "{params.specdec} prepare-model --out {output.model:q} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        model=dataset_model_input,
    output:
        prompts=f"{RESULTS}/prompts/{{dataset}}.jsonl",
        skipped=f"{RESULTS}/prompts/{{dataset}}.skipped.csv",
        skipped_html=report(
            f"{RESULTS}/prompts/{{dataset}}.skipped.html",
            caption="../report/skipped.rst",
            category="Datasets",
            subcategory="{dataset}",
        ),
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
        specdec=SPECDEC,
    shell:
        "{params.specdec} prepare-dataset --name {wildcards.dataset:q} --spec {params.spec:q}"
        " --model {params.model:q} --model-spec {params.model_spec:q} --seed {params.seed:q}"
        " --out {output.prompts:q} --skipped {output.skipped:q}"
        " --skipped-html {output.skipped_html:q} > {log:q} 2>&1"
