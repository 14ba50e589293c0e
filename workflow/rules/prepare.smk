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
        files=dataset_files,
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
        fingerprints=lambda wildcards: model_fingerprints(
            dataset_tokenizer_model(wildcards.dataset)
        ),
        specdec=SPECDEC,
    shell:
        "{params.specdec} prepare-dataset --name {wildcards.dataset:q} --spec {params.spec:q}"
        " --model {params.model:q} --model-spec {params.model_spec:q} --seed {params.seed:q}"
        " --out {output.prompts:q} --skipped {output.skipped:q}"
        " --skipped-html {output.skipped_html:q} > {log:q} 2>&1"


# The CPU decoding kernels of a model, dtype and batch size, chosen once for every cell of
# that setup (decoding.kernels): chosen in each cell, a busy moment could give AR and
# speculative cells of one setup different kernels. A local rule: on a cluster it times the
# submit host's CPU, which is right only where CPU cells run on that kind of CPU.
rule choose_kernels:
    input:
        model=named_model_input,
    output:
        choice=f"{RESULTS}/kernels/{{model}}--{{dtype}}--b{{batch}}.json",
    log:
        "logs/choose_kernels/{model}--{dtype}--b{batch}.log",
    conda:
        "../../envs/specdec.yaml"
    threads: cpu_threads()
    params:
        model_spec=lambda wildcards: json.dumps(config["models"][wildcards.model]),
        fingerprints=lambda wildcards: model_fingerprints(wildcards.model),
        specdec=SPECDEC,
    shell:
        "{params.specdec} choose-kernels --model {wildcards.model:q} --model-spec {params.model_spec:q}"
        " --dtype {wildcards.dtype:q} --batch-size {wildcards.batch} --threads {threads}"
        " --out {output.choice:q} > {log:q} 2>&1"
